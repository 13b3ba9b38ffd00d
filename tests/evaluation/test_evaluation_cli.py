"""eval.py and compare.py as a user runs them: every bad input is one line and exit 2 with nothing
written; compare.py prints the side-by-side table and draws the chart."""

from __future__ import annotations

import json

import pytest

EVAL = "evaluation/eval.py"
COMPARE = "evaluation/compare.py"


def bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "<human>: hi\\n<bot>: hello"}\n{"text": ""}\nnot json\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("task: [unclosed\n  dataset_path: x\n")
    taken = tmp_path / "taken"
    (taken / "results.json").mkdir(parents=True)  # a folder where results.json should go
    return [
        (["--model", str(tmp_path / "no-such-model")], ["--model", "does not exist"]),
        (["--data", str(tmp_path / "none.jsonl")], ["--data", "does not exist"]),
        (["--data", str(empty)], ["--data", "holds no records"]),
        (["--data", str(bad)], ["2 malformed line(s)", "first: line 2"]),
        (["--tasks", "arc_esy"], ["unknown task 'arc_esy'", "did you mean arc_easy"]),
        (["--tasks", "lambada_openai"], ["lambada_openai", "HF_HUB_OFFLINE", "offline tasks:"]),
        (["--tasks", "perplexity,missing.yaml"], ["YAML file missing.yaml does not exist"]),
        (["--limit", "-1"], ["--limit must be >= 0"]),
        (["--output", str(blocker / "out")], ["--output", "a-file is not a folder"]),
        (["--compare", "embedded"], ["--compare names the same model"]),
        (["--model", str(tmp_path), "--compare", str(tmp_path) + "/"], ["same model"]),
        # A stock group whose member tasks read hub data (no dataset_path of its own).
        (["--tasks", "mmlu_pro"], ["mmlu_pro", "TIGER-Lab/MMLU-Pro", "offline tasks:"]),
        (["--compare", "nobody/no-such-model"], ["--compare", "no-such-model", "HF_HUB_OFFLINE"]),
        (["--tasks", "arc_easy", "--data", str(bad)], ["--data is read only by the perplexity"]),
        (["--tasks", str(broken_yaml)], ["--tasks", "broken.yaml"]),
        (["--output", str(taken)], ["--output", "results.json", "not a regular file"]),
    ]


def test_bad_inputs_are_one_line_errors(cli, tmp_path, in_process):
    """Each case through eval.py's main(argv) in this process (the same run_main and
    assertions; the subprocess table of tests/test_bad_input.py proves eval.py's contract as a
    process), then one case that fails late as a real process."""
    env = cli.user_env(HF_HUB_OFFLINE="1")
    default_out = cli.REPO / "eval_results"
    existed = default_out.exists()
    for i, (args, needles) in enumerate(bad_inputs(tmp_path)):
        # Each case also names a fresh --output (unless it is about --output): nothing may
        # appear there, whether or not the default folder already exists.
        out = tmp_path / f"out{i}"
        extra = [] if "--output" in args else ["--output", str(out)]
        proc = in_process(EVAL, *args, *extra, env={"HF_HUB_OFFLINE": "1"})
        cli.assert_one_line_error(proc, *needles)
        assert not out.exists(), args
    assert default_out.exists() == existed  # nothing written for any of them
    assert list((tmp_path / "taken").iterdir()) == [tmp_path / "taken" / "results.json"]
    # A model that fails only when loaded (after the cheap checks) leaves no output folder either.
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    out = tmp_path / "late" / "out"
    proc = cli.run(EVAL, "--model", not_a_model, "--tasks", "arc_easy", "--output", out, env=env)
    cli.assert_one_line_error(proc, "has no config.json")
    assert not (tmp_path / "late").exists()


def records(model: str, acc: float, ppl: float) -> dict:
    return {
        "model": model,
        "results": {
            "perplexity": {
                "token_perplexity": ppl,
                "bits_per_byte": 1.5,
                "word_perplexity": 300.0,
                "n": 64,
            },
            "arc_easy": {
                "acc": acc,
                "acc_stderr": 0.02,
                "acc_norm": acc - 0.05,
                "acc_norm_stderr": 0.02,
                "n": 100,
            },
        },
        "settings": {"tasks": "perplexity,arc_easy", "limit": 100},
        "versions": {},
        "seconds": 12.0,
    }


def test_compare_prints_deltas_and_plots(cli, tmp_path):
    a, b = tmp_path / "a" / "results.json", tmp_path / "b.json"
    a.parent.mkdir()
    a.write_text(json.dumps(records("base", 0.50, 20.0)))
    b.write_text(json.dumps(records("tuned", 0.55, 18.0)))
    png, md = tmp_path / "ab.png", tmp_path / "ab.md"
    proc = cli.run(COMPARE, a.parent, b, "--plot", png, "--output", md)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| task | metric | n | base | tuned | Δ tuned |"
    assert "| arc_easy | acc | 100 | 0.5000 ± 0.0200 | 0.5500 ± 0.0200 | +0.0500 ✓ |" in lines
    assert "| perplexity | token_perplexity | 64 | 20.0000 | 18.0000 | -2.0000 ✓ |" in lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "# Evaluation: base vs tuned" in md.read_text()


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "does not exist"),
        ("{not json", "cannot read"),
        ('{"x": 1}', "not an eval.py results.json"),
    ],
)
def test_compare_bad_results_file(cli, tmp_path, content, needle):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    cli.assert_one_line_error(cli.run(COMPARE, path), needle)
