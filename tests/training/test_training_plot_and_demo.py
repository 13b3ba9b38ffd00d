"""`tools/plot_metrics.py` on a written metrics.jsonl (its main(argv) in this process), and the
CPU demo launcher end to end."""

from __future__ import annotations

import json
import subprocess

import pytest


def _write_metrics(path):
    with open(path, "w") as f:
        for step in range(1, 6):
            rec = {
                "kind": "train",
                "step": step,
                "total_steps": 5,
                "loss": 3.0 / step,
                "lr": 1e-4 * (5 - step) / 5,
                "grad_norm": 1.0,
                "tokens_per_s": 100.0 + step,
            }
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"kind": "eval", "step": 5, "eval_loss": 0.9}) + "\n")


def test_plot_metrics_writes_a_png(tmp_path, tt, in_process):
    _write_metrics(tmp_path / "metrics.jsonl")
    r = in_process(tt.REPO / "tools" / "plot_metrics.py", tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "metrics.png"
    assert r.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


@pytest.mark.parametrize("make", ["missing", "empty", "garbage"])
def test_plot_metrics_bad_input(tmp_path, tt, make, in_process, cli):
    """In-process through main(argv); tests/test_bad_input.py runs the script on the same
    kinds of file as a subprocess."""
    target = tmp_path / "metrics.jsonl"
    if make == "empty":
        target.write_text("")
    elif make == "garbage":
        target.write_text("not json\n")
    r = in_process(tt.REPO / "tools" / "plot_metrics.py", target)
    cli.assert_one_line_error(r)
    assert not (tmp_path / "metrics.png").exists()


@pytest.mark.slow
def test_cpu_demo_end_to_end(tmp_path, tt):
    """The `make demo` path with 2 steps: prepare, 2-stage gloo fine-tune, convert, print, and
    the before/after evaluation (5 documents per task)."""
    out = tmp_path / "hf"
    r = subprocess.run(
        ["bash", str(tt.REPO / "training" / "finetune-smollm2-135m-cpu.sh")],
        cwd=tt.REPO,
        env=tt.clean_env(
            FINETUNE_TOTAL_STEPS="2",
            FINETUNE_CHECKPOINT_STEPS="1",
            FINETUNE_CHECKPOINT_PATH=str(tmp_path / "ckpt"),
            DEMO_OUTPUT=str(out),
            DEMO_EVAL_LIMIT="5",
            DEMO_EVAL_OUTPUT=str(tmp_path / "eval"),
        ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert str(out) in r.stdout
    assert "step 2/2 | loss" in r.stdout
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "checkpoint_2"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| arc_easy | acc | 5 |" in report and "Δ hf" in report
    # The HF folder loads and carries the <human>/<bot> chat template.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<human>" in text
