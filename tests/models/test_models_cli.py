"""The conversion and prepare scripts: round trips and a trainer checkpoint (the `latest` pointer,
--fp16) run as a user runs them, and every bad input (one line on stderr, exit 2,
nothing written), most through the script's main(argv) in this process (the `in_process`
fixture; tests/test_bad_input.py runs such cases as subprocesses)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openchatkit.models.convert import convert_hf_to_sharded, convert_sharded_to_hf
from openchatkit.models.stage import StageModel, save_stage


def assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, make_tiny, add_tokenizer):
    """A tiny llama HF folder with a tokenizer, and its layer-sharded form (built in-process;
    the scripts are exercised by the tests)."""
    base = tmp_path_factory.mktemp("tiny")
    hf = add_tokenizer(make_tiny(base / "tiny-llama", "llama"))
    return hf, convert_hf_to_sharded(hf, base / "sharded", "llama")


@pytest.fixture
def llama_sharded(tmp_path, tiny_llama):
    """A private copy of the tiny sharded model (tests damage it)."""
    hf, sharded = tiny_llama
    return hf, Path(shutil.copytree(sharded, tmp_path / "sharded"))


def test_cli_round_trip_is_exact_and_overwrite_needs_the_flag(
    tmp_path, tiny_llama, cli, in_process
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, _ = tiny_llama
    proc = cli.run(
        "tools/convert_from_hf_llama.py", "--model-name", hf, "--save-dir", tmp_path / "out"
    )
    assert proc.returncode == 0, proc.stderr
    sharded = tmp_path / "out" / "tiny-llama"  # a local path keeps its folder name
    assert proc.stdout.strip() == str(sharded)
    assert (sharded / "tokenizer.json").is_file()
    out = tmp_path / "back"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # The two refusals in this process (the one-line contract of the real process for a full
    # --save-path is a row of tests/test_bad_input.py); the conversions around them are real.
    proc = in_process("tools/convert_to_hf_llama.py", "--ckpt-path", sharded, "--save-path", out)
    cli.assert_one_line_error(proc, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # keep.txt is not something the kit writes: --overwrite refuses too (security finding 18).
    args = ["--ckpt-path", sharded, "--save-path", out, "--overwrite"]
    proc = in_process("tools/convert_to_hf_llama.py", *args)
    cli.assert_one_line_error(proc, str(out), "keep.txt")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").rename(out / "config.json")  # an earlier output is replaced whole
    proc = cli.run(
        "tools/convert_to_hf_llama.py",
        "--ckpt-path",
        sharded,
        "--save-path",
        out,
        "--n-stages",
        2,
        "--overwrite",
    )
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    a, b = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w5 w7")["input_ids"] == [5, 7]


def test_trainer_checkpoint_with_latest_gets_the_openchatkit_template(tmp_path, tiny_llama, cli):
    from transformers import AutoTokenizer

    _, sharded = tiny_llama
    root = tmp_path / "model_ckpts"
    ckpt = root / "checkpoint_5"
    for i, layers in enumerate([range(0, 2), range(2, 4)]):
        save_stage(StageModel.from_sharded(sharded, layers, i == 0, i == 1), ckpt)
    (ckpt / "optimizer").mkdir()
    torch.save({"state": {}}, ckpt / "optimizer" / "stage_000.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": 5, "chat_format": "openchatkit"}))
    (root / "latest").write_text("checkpoint_5\n")
    proc = cli.run(
        "tools/convert_to_hf_llama.py",
        "--ckpt-path",
        root,
        "--save-path",
        tmp_path / "hf",
        "--fp16",
    )
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "w2"},
            {"role": "assistant", "content": "w3"},
            {"role": "user", "content": "w4"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<human>: w2\n<bot>: w3\n<human>: w4\n<bot>:"
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {
        torch.float16
    }


def test_wrong_converter_is_refused(tmp_path, tiny_llama, cli, in_process):
    hf, sharded = tiny_llama
    proc = in_process(
        "tools/convert_from_hf_gptj.py", "--model-name", hf, "--save-path", tmp_path / "x"
    )
    cli.assert_one_line_error(proc, "llama", "convert_from_hf_llama.py")
    assert_nothing_written(tmp_path, "x")
    proc = in_process(
        "tools/convert_to_hf_gptneox.py", "--ckpt-path", sharded, "--save-path", tmp_path / "y"
    )
    cli.assert_one_line_error(proc, "llama", "convert_to_hf_llama.py")
    assert_nothing_written(tmp_path, "y")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_layer_file(tmp_path, llama_sharded, damage, cli, in_process):
    _, sharded = llama_sharded
    layer = sharded / "layer_00002.safetensors"
    if damage == "missing":
        layer.unlink()
    else:
        layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    proc = in_process(
        "tools/convert_to_hf_llama.py", "--ckpt-path", sharded, "--save-path", tmp_path / "hf"
    )
    cli.assert_one_line_error(proc, "layer_00002.safetensors")
    assert_nothing_written(tmp_path, "hf")


def test_stage_layout_mismatch(tmp_path, tiny_llama, cli, in_process):
    _, sharded = tiny_llama
    proc = in_process(
        "tools/convert_to_hf_llama.py",
        "--ckpt-path",
        sharded,
        "--save-path",
        tmp_path / "hf",
        "--n-stages",
        3,
        "--n-layer-per-stage",
        2,
    )
    cli.assert_one_line_error(proc, "--n-stages 3", "4 layers")
    assert_nothing_written(tmp_path, "hf")


def test_ckpt_that_is_neither_format(tmp_path, cli, in_process):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "weights.pt").write_bytes(b"not a checkpoint")
    proc = in_process(
        "tools/convert_to_hf_llama.py", "--ckpt-path", bogus, "--save-path", tmp_path / "hf"
    )
    cli.assert_one_line_error(proc, "neither")
    assert_nothing_written(tmp_path, "hf")


def test_prepare_offline_is_one_line(tmp_path, cli):
    env = cli.user_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = cli.run("pretrained/GPT-J-6B/prepare.py", "--save-dir", tmp_path / "pre", env=env)
    cli.assert_one_line_error(proc, "EleutherAI/gpt-j-6b")
    assert not (tmp_path / "pre").exists() or not any((tmp_path / "pre").iterdir())


def test_smollm2_prepared_and_converted_back_answers_paris(tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = cli.run("pretrained/SmolLM2-135M-Instruct/prepare.py", "--save-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    sharded = tmp_path / "HuggingFaceTB_SmolLM2-135M-Instruct"
    assert json.loads((sharded / "manifest.json").read_text())["tie_word_embeddings"] is True
    # Back to HF in-process (the script itself is exercised above).
    convert_sharded_to_hf(sharded, tmp_path / "hf", "llama")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_model_load_benchmark_prints_the_table(tmp_path, tiny_llama, cli):
    hf, _ = tiny_llama
    proc = cli.run(
        "benchmarks/bench_model_load.py",
        "--model-name",
        hf,
        "--work-dir",
        tmp_path,
        "--repeats",
        1,
        "--n-stages",
        2,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 5, proc.stdout  # header + 4 methods
    for label in ("whole model", "one stage (layers 0-1 of 4", "from_pretrained", ".pt per layer"):
        assert any(label in row for row in rows), label
    assert (tmp_path / "sharded" / "manifest.json").is_file()
    assert (tmp_path / "pt" / "pytorch_3.pt").is_file()
