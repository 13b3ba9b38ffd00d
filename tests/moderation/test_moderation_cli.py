"""inference/moderate.py and the bot's moderation flags run as a user runs them: a tiny random
llama saved as an HF folder, a trainer-style layer-sharded folder as MODEL, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

from openchatkit.evaluation.moderation_metrics import evaluate
from openchatkit.inference.moderator import load_moderator
from openchatkit.moderation import LABELS

MODERATE = "inference/moderate.py"
VALID = [
    {"text": "Can you recommend a good book?", "label": "casual"},
    {"text": "I hate my job so much.", "label": "possibly needs caution"},
    {"text": "You are a useless bot.", "label": "needs caution"},
    {"text": "I want to make him suffer.", "label": "needs intervention"},
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, char_tokenizer, tiny_llama):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-moderation"
    tiny_llama.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_eval_input_and_text(cli, tmp_path, tiny_folder):
    valid = write_jsonl(tmp_path / "valid.jsonl", VALID)
    proc = cli.run(MODERATE, "--model", tiny_folder, "--dtype", "float32", "--eval", valid)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^accuracy \d\.\d{3} \(\d/4\)$", out, re.M), out
    assert "confusion matrix" in out and "precision  recall  support" in out
    for i, label in enumerate(LABELS, 1):
        assert f"{i}. {label}" in out


def load_script(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("moderate_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_input_and_text_in_process(cli, tmp_path, tiny_folder, capsys):
    # The same script's main() in this process: no second torch start-up on a busy CPU.
    moderate = load_script(cli.REPO / MODERATE)
    valid = write_jsonl(tmp_path / "valid.jsonl", VALID)
    common = ["--model", str(tiny_folder), "--dtype", "float32"]
    assert moderate.main([*common, "--input", str(valid)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == [r["text"] for r in VALID]
    for r in rows:
        assert r["label"] in LABELS and abs(sum(r["probabilities"].values()) - 1) < 1e-4
    assert moderate.main([*common, "hello"]) == 0
    label, prob = capsys.readouterr().out.strip().rsplit(" ", 1)
    assert label in LABELS and 0.2 <= float(prob) <= 1.0
    assert moderate.main([*common, "--json", "hello"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["label"] == label and set(record["probabilities"]) == set(LABELS)


def test_sharded_folder_as_model(tmp_path, tiny_folder):
    from openchatkit.models.convert import convert_hf_to_sharded

    sharded = convert_hf_to_sharded(tiny_folder, tmp_path / "sharded", "llama")
    texts = [r["text"] for r in VALID]
    a = load_moderator(str(tiny_folder), dtype="float32").log_likelihoods(texts)
    b = load_moderator(str(sharded), dtype="float32").log_likelihoods(texts)
    assert torch.allclose(a, b, atol=1e-5)


def test_evaluate_metrics():
    truth = ["casual", "casual", "needs caution", "needs intervention"]
    pred = ["casual", "needs caution", "needs caution", "casual"]
    report = evaluate(truth, pred)
    assert report["accuracy"] == 0.5
    assert report["confusion"][0][:2] == [1, 1] and report["confusion"][1][1] == 1
    assert report["per_label"]["casual"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert report["per_label"]["needs caution"]["precision"] == 0.5


@pytest.mark.parametrize(
    "args, files, needles",
    [
        (["   "], {}, ["empty"]),
        ([], {}, ["exactly one of"]),
        (["--model", "./no/such/folder", "hi"], {}, ["--model", "does not exist"]),
        (["--eval", "{bad}"], {"bad": ['{"text": "a", "label": "casual"}', "{oops", "[]"]},
         ["2 bad line(s) of 3", "line 2"]),
        (["--eval", "{bad}"], {"bad": [{"text": "a", "label": "spicy"}]}, ["not one of"]),
        (["--eval", "{bad}"], {"bad": [{"text": "a"}]}, ["no `label`"]),
        (["--input", "{bad}"], {"bad": [{"text": ""}]}, ["1 bad line(s)"]),
        (["--eval", "/no/such.jsonl"], {}, ["no such file"]),
    ],
)  # fmt: skip
def test_bad_input_one_line(cli, tmp_path, args, files, needles):
    paths = {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in files.items()}
    args = [a.format(**paths) for a in args]
    cli.assert_one_line_error(cli.run(MODERATE, *args), *needles)


def test_tokenizer_that_cannot_encode_the_prompt(tmp_path, tiny_folder):
    from openchatkit.errors import UserError  # what moderate.py turns into one line, exit 2

    shots = write_jsonl(tmp_path / "shots.jsonl", [{"text": "caf\u00e9 \u2603", "label": "casual"}])
    with pytest.raises(UserError, match="cannot encode"):
        load_moderator(str(tiny_folder), examples=shots)


def test_bot_flags(cli):
    proc = cli.run("inference/bot.py", "--moderation-threshold", "2", "--moderation", "x")
    cli.assert_one_line_error(proc, "--moderation-threshold", usage_first=True)
    proc = cli.run("inference/bot.py", "--moderation", "./no/such/folder", stdin="")
    cli.assert_one_line_error(proc, "--moderation", "does not exist")
