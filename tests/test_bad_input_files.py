"""Hostile file contents through the scripts, the way a user meets them (rows beside the
bad-input table of tests/test_bad_input.py): each is refused with one stderr line, exit code 2
and no traceback, and the output location stays as it was."""

from __future__ import annotations

import json

NESTED = "[" * 100_000


def test_a_latest_leading_outside_the_checkpoint_folder(tmp_path, cli):
    root = tmp_path / "ckpt"
    (root / "checkpoint_1").mkdir(parents=True)
    (root / "latest").write_text("/etc")
    out = tmp_path / "out"
    proc = cli.run("tools/convert_to_hf_llama.py", "--ckpt-path", root, "--save-path", out)
    cli.assert_one_line_error(proc, "latest", "checkpoint_<step>")
    assert not out.exists()


def test_a_nested_line_in_a_metrics_file(tmp_path, cli):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-5, "tokens_per_s": 9}) + "\n")
    with open(path, "a") as f:
        f.write(NESTED + "\n")
    proc = cli.run("tools/plot_metrics.py", path, "--output", tmp_path / "plot.png")
    cli.assert_one_line_error(proc, "metrics.jsonl:2", "not a JSON line")
    assert not (tmp_path / "plot.png").exists()


def test_overwrite_of_a_folder_that_is_not_an_earlier_output(tmp_path, cli):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("{}")
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    proc = cli.run(
        "tools/convert_to_hf_llama.py", "--ckpt-path", ckpt, "--save-path", out, "--overwrite"
    )
    cli.assert_one_line_error(proc, str(out), "notes.txt", "photos/")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "photos"]
