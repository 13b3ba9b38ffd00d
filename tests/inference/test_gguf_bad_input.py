"""tools/export_gguf.py and bot.py's GGUF paths refuse bad input in one line, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EXPORT = "tools/export_gguf.py"


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def config_folder(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


@pytest.mark.parametrize(
    "model_type, needles",
    [
        ("gptj", ["GPT-J", "llama.cpp has no GPT-J graph"]),
        ("bert", ["'bert' cannot be exported to GGUF", "llama"]),
    ],
)
def test_refused_architectures(cli, tmp_path, model_type, needles):
    model = config_folder(tmp_path / "m", model_type)
    before = files_under(tmp_path)
    proc = cli.run(EXPORT, "--model", model, "--out", tmp_path / "out.gguf")
    cli.assert_one_line_error(proc, "--model", *needles)
    assert files_under(tmp_path) == before


def test_unknown_outtype(cli, tmp_path):
    model = config_folder(tmp_path / "m", "llama")
    proc = cli.run(EXPORT, "--model", model, "--out", tmp_path / "o.gguf", "--outtype", "q3_k")
    cli.assert_one_line_error(proc, "--outtype", "q3_k", usage_first=True)
    assert not (tmp_path / "o.gguf").exists()


def test_existing_output_needs_overwrite(cli, tmp_path):
    model = config_folder(tmp_path / "m", "llama")
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    proc = cli.run(EXPORT, "--model", model, "--out", out)
    cli.assert_one_line_error(proc, "--out", "exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert files_under(tmp_path) == {"m", "m/config.json", "o.gguf"}


def test_unwritable_output(cli, tmp_path):
    model = config_folder(tmp_path / "m", "llama")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = cli.run(EXPORT, "--model", model, "--out", blocker / "o.gguf")
    cli.assert_one_line_error(proc, "--out")
    proc = cli.run(EXPORT, "--model", model, "--out", "/proc/o.gguf")
    cli.assert_one_line_error(proc, "--out", "/proc")
    assert files_under(tmp_path) == {"m", "m/config.json", "a-file"}


def test_lora_checkpoint_without_its_base(cli, tmp_path):
    ckpt = tmp_path / "lora" / "checkpoint_10"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter.json").write_text(
        json.dumps({"base_model": str(tmp_path / "gone"), "base_fingerprint": "x", "r": 8})
    )
    (tmp_path / "lora" / "latest").write_text("checkpoint_10")
    before = files_under(tmp_path)
    proc = cli.run(EXPORT, "--model", tmp_path / "lora", "--out", tmp_path / "o.gguf")
    cli.assert_one_line_error(proc, "--model", "base model", "does not exist")
    assert files_under(tmp_path) == before


def test_missing_model_and_gguf_input(cli, tmp_path):
    proc = cli.run(EXPORT, "--model", tmp_path / "nope", "--out", tmp_path / "o.gguf")
    cli.assert_one_line_error(proc, "--model", "no such folder")
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF")
    proc = cli.run(EXPORT, "--model", gguf_file, "--out", tmp_path / "o.gguf")
    cli.assert_one_line_error(proc, "--model", "already a GGUF file")
    assert files_under(tmp_path) == {"x.gguf"}


def test_gguf_file_transformers_cannot_read_on_torch_backend(cli, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    proc = cli.run("inference/bot.py", "--model", bad, "--backend", "torch", "--prompt", "hi")
    cli.assert_one_line_error(proc, "--model", "transformers cannot read", "--backend llama.cpp")
    assert files_under(tmp_path) == {"broken.gguf"}


def test_llamacpp_backend_refuses_hf_folder(cli, tmp_path):
    model = config_folder(tmp_path / "m", "llama")
    proc = cli.run("inference/bot.py", "--model", model, "--backend", "llama.cpp", "--prompt", "hi")
    cli.assert_one_line_error(proc, "--backend llama.cpp", "export_gguf.py")
