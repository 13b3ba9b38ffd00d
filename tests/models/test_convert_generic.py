"""The generic converters `tools/convert_from_hf.py` and `tools/convert_to_hf.py`, which read the
architecture from their input: every registered architecture (Qwen2 and Mistral included, which
have no script of their own) goes HF -> layer-sharded -> HF bit-identically through them, run as
a user runs them (subprocesses) for Qwen2, the scripts' CLI contract, and through `main(argv)`
in this process for the rest, Mistral's exact fp32 round trip included (the same assertions as
Qwen2's: what differs between the two is the architecture, not the process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openchatkit.models.registry import MODEL_TYPES, architecture_names

VOCAB = 96
TO_HF, FROM_HF = "tools/convert_to_hf.py", "tools/convert_from_hf.py"


def tiny_config(model_type: str):
    """A tiny config of each registered architecture (GQA where it has it; Mistral's window
    shorter than the layers' context so that it is a real setting)."""
    import transformers

    sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    gqa = dict(sizes, num_key_value_heads=2, max_position_embeddings=64)
    configs = {
        "gpt_neox": ("GPTNeoXConfig", dict(sizes, rotary_pct=0.5, max_position_embeddings=64)),
        "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64)),
        "llama": ("LlamaConfig", gqa),
        "qwen2": ("Qwen2Config", gqa),
        "mistral": ("MistralConfig", dict(gqa, sliding_window=4)),
    }
    name, kwargs = configs[model_type]
    return getattr(transformers, name)(vocab_size=VOCAB, **kwargs)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, add_tokenizer):
    """tiny_hf(name) -> a random HF folder (with a tokenizer) of our architecture `name`; every
    tensor, biases and norms included, random, so a dropped or swapped one is seen."""
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("generic")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            torch.manual_seed(len(made))
            model = AutoModelForCausalLM.from_config(tiny_config(MODEL_TYPES[name]))
            with torch.no_grad():
                for param in model.parameters():
                    param.normal_(0.0, 0.3)
            folder = base / f"tiny-{name}"
            model.save_pretrained(folder)
            made[name] = add_tokenizer(folder)
        return made[name]

    return make


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(left) == sorted(right)
    for key, tensor in left.items():
        assert right[key].dtype == tensor.dtype, key
        assert torch.equal(right[key], tensor), key


def test_every_registered_architecture_has_a_tiny_config():
    # A new registry line without a line in tiny_config fails here, not silently skips.
    for name in architecture_names():
        tiny_config(MODEL_TYPES[name])


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_cli_round_trip_is_exact(name, tmp_path, tiny_hf, cli, in_process):
    hf = tiny_hf(name)
    sharded, back = tmp_path / "sharded", tmp_path / "back"
    run = cli.run if name == "qwen2" else in_process  # one real process per script suffices
    proc = run(FROM_HF, "--model-name", hf, "--save-path", sharded)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sharded)
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["architecture"] == name
    assert manifest["num_layers"] == 3
    proc = run(TO_HF, "--ckpt-path", sharded, "--save-path", back)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(back)
    assert "3 layers (1 stages x 3 layers) -> HF" in proc.stderr
    assert_same_weights(hf, back)
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[name]
    if name == "mistral":
        assert config["sliding_window"] == 4
    assert (back / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", architecture_names())
def test_in_process_round_trip_of_every_architecture(name, tmp_path, tiny_hf, in_process):
    hf = tiny_hf(name)
    sharded, back = tmp_path / "sharded", tmp_path / "back"
    proc = in_process(FROM_HF, "--model-name", hf, "--save-path", sharded, "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((sharded / "manifest.json").read_text())["architecture"] == name
    proc = in_process(TO_HF, "--ckpt-path", sharded, "--save-path", back, "--n-stages", "3")
    assert proc.returncode == 0, proc.stderr
    assert "(3 stages x 1 layers)" in proc.stderr
    left, right = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(left) == sorted(right)
    for key, tensor in left.items():  # cast once to bf16 on the way in, kept on the way out
        assert right[key].dtype == torch.bfloat16, key
        assert torch.equal(right[key], tensor.to(torch.bfloat16)), key


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_alias_script_refuses_another_architecture_naming_the_generic_one(
    name, tmp_path, tiny_hf, in_process, cli
):
    hf = tiny_hf(name)
    proc = in_process("tools/convert_from_hf_llama.py", "--model-name", hf, "--save-path",
                      tmp_path / "out")  # fmt: skip
    cli.assert_one_line_error(proc, repr(MODEL_TYPES[name]), "tools/convert_from_hf.py")
    assert not (tmp_path / "out").exists()
    sharded = tmp_path / "sharded"
    assert in_process(FROM_HF, "--model-name", hf, "--save-path", sharded).returncode == 0
    proc = in_process("tools/convert_to_hf_gptneox.py", "--ckpt-path", sharded, "--save-path",
                      tmp_path / "back")  # fmt: skip
    cli.assert_one_line_error(proc, repr(MODEL_TYPES[name]), "tools/convert_to_hf.py")
    assert not (tmp_path / "back").exists()


def test_alias_hint_names_the_right_alias(tmp_path, tiny_hf, in_process, cli):
    proc = in_process("tools/convert_from_hf_gptj.py", "--model-name", tiny_hf("llama"),
                      "--save-path", tmp_path / "out")  # fmt: skip
    cli.assert_one_line_error(proc, "'llama'", "tools/convert_from_hf_llama.py")


def test_generic_from_hf_refuses_an_unsupported_model_type(tmp_path, in_process, cli):
    hf = tmp_path / "bert"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = in_process(FROM_HF, "--model-name", hf, "--save-path", tmp_path / "out")
    cli.assert_one_line_error(proc, "--model-name", "'bert'", *MODEL_TYPES.values())
    assert not (tmp_path / "out").exists()


def test_generic_to_hf_refuses_an_unsupported_architecture(tmp_path, tiny_hf, in_process, cli):
    sharded = tmp_path / "sharded"
    assert in_process(FROM_HF, "--model-name", tiny_hf("qwen2"), "--save-path",
                      sharded).returncode == 0  # fmt: skip
    manifest = json.loads((sharded / "manifest.json").read_text())
    (sharded / "manifest.json").write_text(json.dumps(dict(manifest, architecture="bert")))
    proc = in_process(TO_HF, "--ckpt-path", sharded, "--save-path", tmp_path / "out")
    cli.assert_one_line_error(proc, "--ckpt-path", "'bert'", *architecture_names())
    assert not (tmp_path / "out").exists()


def test_generic_to_hf_reads_a_trainer_checkpoint_folder(tmp_path, tiny_hf, in_process):
    # A folder holding `latest` (what the trainer writes): the checkpoint it names is converted.
    hf = tiny_hf("mistral")
    root = tmp_path / "run"
    assert in_process(FROM_HF, "--model-name", hf, "--save-path",
                      root / "checkpoint_7").returncode == 0  # fmt: skip
    (root / "latest").write_text("checkpoint_7")
    proc = in_process(TO_HF, "--ckpt-path", root, "--save-path", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(hf, tmp_path / "back")


def test_generic_to_hf_merges_a_lora_checkpoint_of_its_base_architecture(
    tmp_path, tiny_hf, in_process, cli
):
    # A LoRA checkpoint on a Qwen2 base, written as the trainer writes one (adapter.json naming
    # the base, adapter_stage_0.safetensors); the generic script reads the architecture from the
    # base and writes base + adapters, whose logits are those of our stage with the adapters.
    from transformers import AutoModelForCausalLM

    from openchatkit.models.lora import (
        LoraSettings,
        adapter_meta,
        apply_lora,
        save_adapter_stage,
    )
    from openchatkit.models.stage import StageModel

    base = tmp_path / "base"
    assert in_process(FROM_HF, "--model-name", tiny_hf("qwen2"), "--save-path",
                      base).returncode == 0  # fmt: skip
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    stage = StageModel.from_sharded(base, range(3), True, True, dtype=torch.float32)
    apply_lora(stage, settings)
    with torch.no_grad():  # B starts at zero: make the adapters change the model
        for name, param in stage.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.3)
    ckpt = tmp_path / "run" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    save_adapter_stage(stage, ckpt, 0, settings.bias)
    (ckpt / "adapter.json").write_text(json.dumps(adapter_meta(settings, base)))
    ids = torch.randint(0, VOCAB, (2, 8))
    stage.eval()
    with torch.no_grad():
        ours = stage(ids)

    out = tmp_path / "merged"
    proc = in_process(TO_HF, "--ckpt-path", ckpt, "--save-path", out)
    cli.assert_one_line_error(proc, "--merge-lora")
    proc = in_process(TO_HF, "--ckpt-path", ckpt, "--merge-lora", "--save-path", out)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.model_type == "qwen2"
    with torch.no_grad():
        theirs = model(ids, use_cache=False).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # The alias of another architecture refuses it, naming the script that converts it.
    proc = in_process("tools/convert_to_hf_llama.py", "--ckpt-path", ckpt, "--merge-lora",
                      "--save-path", tmp_path / "other")  # fmt: skip
    cli.assert_one_line_error(proc, "qwen2", "tools/convert_to_hf.py")
    assert not (tmp_path / "other").exists()


def test_generic_to_hf_refuses_layers_without_manifest_of_an_unknown_type(
    tmp_path, in_process, cli
):
    # Layer files described only by a config.json whose model_type the registry does not know.
    folder = tmp_path / "layers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    (folder / "layer_00000.safetensors").write_bytes(b"")
    proc = in_process(TO_HF, "--ckpt-path", folder, "--save-path", tmp_path / "out")
    cli.assert_one_line_error(proc, "--ckpt-path", "model_type", *architecture_names())
    assert not (tmp_path / "out").exists()
