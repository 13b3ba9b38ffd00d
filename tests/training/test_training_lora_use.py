"""LoRA beyond the default: trained biases (`--lora-bias all|lora_only`) exported in PEFT's own
keys and merged, and a LoRA trainer checkpoint given directly to `evaluation/eval.py --model` and
`inference/bot.py --model` (base from adapter.json, fingerprint-checked, adapters applied in
memory).

Tiny GPT-NeoX (it has biases, in every linear and norm), 2 steps per run.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch


@pytest.fixture(scope="module")
def neox(tiny, tt, tmp_path_factory):
    """The tiny GPT-NeoX's HF base, and `neox["run"](bias)`: a 2-step LoRA run with that
    --lora-bias (made once, on first use), its adapter exported by tools/export_lora.py.

    These inputs are made by the scripts' main(argv) in this process (`tt.main_here`): the
    trainer, the export and the converters run as real processes in test_training_lora.py
    (and tests/models/test_models_cli.py), merge_lora.py and eval.py below."""
    root = tmp_path_factory.mktemp("lora-neox")
    hf = root / "hf"
    r = tt.main_here(
        "tools/convert_to_hf_gptneox.py", "--ckpt-path", tiny["gpt_neox"], "--save-path", hf
    )
    assert r.returncode == 0, r.stderr
    runs = {}

    def run(bias):
        if bias not in runs:
            ckpt = root / f"run-{bias}"
            flags = dict(lora_r=4, lora_dropout=0.0, lora_bias=bias, total_steps=2, lr=1e-2)
            r = tt.main_here(tt.TRAIN, *tt.train_args(tiny, "gpt_neox", ckpt, **flags))
            assert r.returncode == 0, r.stderr[-3000:]
            adapter = root / f"adapter-{bias}"
            r = tt.main_here("tools/export_lora.py", "--ckpt-path", ckpt, "--save-path", adapter)
            assert r.returncode == 0, r.stderr
            runs[bias] = ckpt, adapter
        return runs[bias]

    return {"root": root, "hf": hf, "run": run}


def _trainer_logits(base, folder, ids):
    """Logits of our stage model with the checkpoint's adapters (and trained biases)."""
    from openchatkit.models.lora import apply_lora, load_adapter_into, read_adapter_checkpoint
    from openchatkit.models.stage import StageModel

    stage = StageModel.from_sharded(base, range(4), True, True, dtype=torch.float32)
    _, _, settings, _ = read_adapter_checkpoint(folder)
    apply_lora(stage, settings)
    load_adapter_into(stage, folder, settings.bias)
    stage.eval()
    with torch.no_grad():
        return stage(ids)


# lora_only trains a subset of what all trains (the adapted modules' biases, saved under
# `base_layer` as in all): slow set only.
@pytest.mark.parametrize("bias", ["all", pytest.param("lora_only", marks=pytest.mark.slow)])
def test_trained_biases_export_to_peft_and_merge(bias, tiny, cli, neox):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ckpt, adapter = neox["run"](bias)
    exported = load_file(adapter / "adapter_model.safetensors")
    biases = {k for k in exported if k.endswith(".bias")}
    adapted = {f"base_model.model.gpt_neox.layers.{i}.attention.query_key_value.base_layer.bias"
               for i in range(4)}  # fmt: skip
    if bias == "lora_only":
        assert biases == adapted
    else:  # every bias of the model, as peft trains them: norms, the other linears, final norm
        assert adapted < biases and "base_model.model.gpt_neox.final_layer_norm.bias" in biases
        assert len(biases) == 4 * 6 + 1
    hf_base = AutoModelForCausalLM.from_pretrained(neox["hf"], dtype=torch.float32)
    base_state = {k: v.clone() for k, v in hf_base.state_dict().items()}
    # Trained: every exported bias moved away from the base's.
    for key in biases:
        plain_key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert (exported[key] - base_state[plain_key]).abs().max() > 1e-4, key
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = hf_base(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(hf_base, adapter).eval()
    assert not [w for w in caught if "keys" in str(w.message).lower()], [
        str(w.message) for w in caught
    ]
    # The file holds exactly what peft itself saves for this config: no tensor ignored.
    ours = {k: v.shape for k, v in exported.items()}
    assert ours == {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        theirs = model(ids).logits
    torch.testing.assert_close(theirs, _trainer_logits(tiny["gpt_neox"], ckpt / "checkpoint_2", ids),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert (theirs - plain).abs().max() > 1e-4
    merged = neox["root"] / f"merged-{bias}"
    r = cli.run("tools/merge_lora.py", "--base", neox["hf"], "--adapter", adapter,
                "--save-path", merged)  # fmt: skip
    assert r.returncode == 0, r.stderr
    full = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, theirs, rtol=1e-5, atol=1e-5)


def _files(*folders):
    """Every file under the folders with its size and mtime: proof that nothing was written."""
    return {
        (str(p), p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders
        for p in folder.rglob("*")
    }


def test_eval_takes_lora_checkpoint_as_model(tiny, cli, neox, in_process):
    """--model CKPT (base + adapters in memory) equals --model HF_BASE --adapter EXPORTED. The
    first runs as a user runs it; the second, its reference, calls eval.py's main(argv) in this
    process (`in_process`)."""
    ckpt, adapter = neox["run"]("all")
    env = cli.user_env(HF_HUB_OFFLINE="1")
    common = ["--tasks", "perplexity", "--data", tiny["valid"], "--limit", 5, "--device", "cpu"]
    before = _files(ckpt, tiny["gpt_neox"])
    direct = neox["root"] / "eval-direct"
    r = cli.run("evaluation/eval.py", "--model", ckpt, "--compare", tiny["gpt_neox"],
                "--output", direct, *common, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _files(ckpt, tiny["gpt_neox"]) == before
    exported = neox["root"] / "eval-exported"
    r = in_process("evaluation/eval.py", "--model", neox["hf"], "--adapter", adapter,
                   "--output", exported, *common, env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    a = json.loads((direct / "results.json").read_text())
    base = json.loads((direct / "results_2.json").read_text())
    b = json.loads((exported / "results.json").read_text())
    assert a["model"] == f"gpt_neox + adapter {ckpt.name}/checkpoint_2", a["model"]
    assert base["model"] == "gpt_neox"
    ppl = [x["results"]["perplexity"]["token_perplexity"] for x in (a, b, base)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6, abs=1e-6)
    assert abs(ppl[0] - ppl[2]) > 1e-3  # the adapters are applied
    assert f"gpt_neox + adapter {ckpt.name}/checkpoint_2" in (direct / "report.md").read_text()


def test_eval_lora_checkpoint_bad_base(tiny, cli, neox, tmp_path, in_process):
    """Bad input, refused in one line: eval.py's main(argv) in this process (`in_process`); the
    subprocess table in tests/test_bad_input.py proves the contract for the real process."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(neox["run"]("all")[0], ckpt)
    other = tmp_path / "base-copy"
    shutil.copytree(tiny["gpt_neox"], other)
    meta_path = ckpt / "checkpoint_2" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    env = {"HF_HUB_OFFLINE": "1"}
    args = ["--tasks", "perplexity", "--data", tiny["valid"], "--limit", 2, "--device", "cpu",
            "--output", tmp_path / "out"]  # fmt: skip
    # The base changed since training (same shapes, other weights).
    from safetensors.torch import load_file, save_file

    layer = other / "layer_00001.safetensors"
    save_file({k: v + 1 for k, v in load_file(layer).items()}, layer)
    meta_path.write_text(json.dumps({**meta, "base_model": str(other), "base_model_abs": ""}))
    # As if trained on `other`: meta.json lists adapter.json's size (hash checks are off here).
    record = json.loads((ckpt / "checkpoint_2" / "meta.json").read_text())
    record["files"]["adapter.json"] = {"size": meta_path.stat().st_size}
    (ckpt / "checkpoint_2" / "meta.json").write_text(json.dumps(record))
    r = in_process("evaluation/eval.py", "--model", ckpt, *args, env=env)
    cli.assert_one_line_error(r, f"--model {ckpt}", "trained on", str(other), "fingerprint")
    # The base is gone.
    shutil.rmtree(other)
    r = in_process("evaluation/eval.py", "--model", ckpt, *args, env=env)
    cli.assert_one_line_error(r, f"--model {ckpt}", str(other), "does not exist")
    # A LoRA checkpoint brings its adapters: --adapter on top is refused.
    fake = tmp_path / "adapter"
    fake.mkdir()
    (fake / "adapter_config.json").write_text("{}")
    r = in_process("evaluation/eval.py", "--model", neox["run"]("all")[0], "--adapter", fake,
                   *args, env=env)  # fmt: skip
    cli.assert_one_line_error(r, "--adapter", "brings its own adapters")
    assert not (tmp_path / "out").exists()


def test_locate_base_falls_back_to_the_absolute_path(tiny, tmp_path, monkeypatch):
    """adapter.json records --model-name as given (maybe relative to the trainer's working
    directory) and its absolute form; evaluation from elsewhere finds the base by the latter."""
    from openchatkit.errors import UserError
    from openchatkit.models.lora import LoraSettings, adapter_meta, locate_base

    monkeypatch.chdir(tiny["gpt_neox"].parent)
    meta = adapter_meta(LoraSettings(4, 8.0, 0.0, ("query_key_value",)), "gpt_neox")
    assert meta["base_model"] == "gpt_neox"
    monkeypatch.chdir(tmp_path)
    assert locate_base(meta, "--model x") == tiny["gpt_neox"].resolve()
    with pytest.raises(UserError, match="does not exist"):
        locate_base({**meta, "base_model_abs": str(tmp_path / "nope")}, "--model x")


def test_bot_chats_with_a_lora_checkpoint_as_with_its_exported_adapter(neox, in_process):
    # The trainer's own LoRA checkpoint (trained biases too) as --model: the bot answers as
    # with the base's HF folder and the exported PEFT adapter (tools/export_lora.py).
    ckpt, adapter = neox["run"]("all")
    greedy = ["--prompt", "hello there", "--no-sample", "--max-tokens", "8", "--no-stream",
              "--backend", "torch", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    direct = in_process("inference/bot.py", "--model", ckpt, *greedy, log_level="WARNING")
    assert direct.returncode == 0, direct.stderr
    exported = in_process("inference/bot.py", "--model", neox["hf"], "--adapter", adapter,
                          *greedy, log_level="WARNING")  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert direct.stdout.strip() and direct.stdout == exported.stdout
