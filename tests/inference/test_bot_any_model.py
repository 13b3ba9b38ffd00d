"""The bot takes every MODEL form through the one loader (`models/any_model.py`): a trainer
checkpoint, a layer-sharded folder and a LoRA checkpoint (adapters on their base) chat the same
greedy turn as the HF folder the converter makes of them; flags that need HF weight files are
refused in one line for them. Tiny random llama models, `inference/bot.py` run through
`main(argv)` in this process.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

BOT = "inference/bot.py"
TO_HF = "tools/convert_to_hf.py"
GREEDY = ("--prompt", "w5 w7 w9", "--no-sample", "--max-tokens", "12", "--no-stream",
          "--backend", "torch", "--device", "cpu", "--dtype", "float32")  # fmt: skip


def trainer_meta(folder, step: int) -> None:
    """meta.json as the trainer writes it: step and every file with its size."""
    files = {p.name: {"size": p.stat().st_size} for p in folder.iterdir() if p.is_file()}
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "step": step,
                                                  "files": files}))  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("any_model"))


def build_models(root) -> dict:
    """{"hf": a tiny random llama HF folder (word tokenizer), "sharded": its layer-sharded form,
    "ckpt": a trainer --checkpoint-path holding it as checkpoint_2 (with `latest`), "lora": a
    LoRA run's --checkpoint-path whose checkpoint_3 holds adapters (B not zero) on "sharded"},
    under `root`."""
    from openchatkit.models.convert import convert_hf_to_sharded
    from openchatkit.models.lora import LoraSettings, apply_lora, save_adapter_checkpoint
    from openchatkit.models.stage import StageModel
    from tests.models.conftest import save_tiny_model, save_tiny_tokenizer

    hf = save_tiny_tokenizer(save_tiny_model(root / "hf", "llama", num_layers=2, seed=3))
    sharded = root / "sharded"
    convert_hf_to_sharded(hf, sharded, "llama")
    ckpt = root / "run"
    shutil.copytree(sharded, ckpt / "checkpoint_2")
    trainer_meta(ckpt / "checkpoint_2", 2)
    (ckpt / "latest").write_text("checkpoint_2\n")

    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    stage = StageModel.from_sharded(sharded, range(2), True, True, dtype=torch.float32)
    apply_lora(stage, settings)
    torch.manual_seed(5)
    with torch.no_grad():  # B starts at zero: make the adapters change the model
        for name, param in stage.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.5)
    lora = root / "lora-run"
    folder = lora / "checkpoint_3"
    folder.mkdir(parents=True)
    save_adapter_checkpoint(stage, folder, 0, settings, sharded, sharded)
    trainer_meta(folder, 3)
    (lora / "latest").write_text("checkpoint_3\n")
    return {"hf": hf, "sharded": sharded, "ckpt": ckpt, "lora": lora}


def chat(in_process, model, *extra) -> str:
    proc = in_process(BOT, "--model", model, *GREEDY, *extra, log_level="WARNING")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), proc.stderr
    return proc.stdout


@pytest.mark.parametrize("form", ["ckpt", "sharded"])
def test_a_trainer_checkpoint_chats_as_its_converted_hf_folder(form, models, tmp_path, in_process):
    out = tmp_path / "hf"
    assert in_process(TO_HF, "--ckpt-path", models[form], "--save-path", out).returncode == 0
    assert chat(in_process, models[form]) == chat(in_process, out)


def test_a_lora_checkpoint_chats_as_its_merged_hf_folder(models, tmp_path, in_process):
    merged = tmp_path / "merged"
    proc = in_process(TO_HF, "--ckpt-path", models["lora"], "--merge-lora", "--save-path", merged)
    assert proc.returncode == 0, proc.stderr
    answer = chat(in_process, models["lora"])
    assert answer == chat(in_process, merged)
    # The checkpoint_<step>/ folder itself is the same model.
    assert chat(in_process, models["lora"] / "checkpoint_3") == answer
    # The adapters matter: the base alone gives other logits (its text may still agree on a
    # few greedy tokens, so logits are compared).
    from openchatkit.models.any_model import load_any_model

    ids = torch.tensor([[5, 7, 9, 11]])
    with torch.no_grad():
        adapted = load_any_model(str(models["lora"]), "cpu", "float32").model(ids).logits
        base = load_any_model(str(models["sharded"]), "cpu", "float32").model(ids).logits
    assert (adapted - base).abs().max() > 1e-2


def test_a_checkpoint_with_an_adapter_chats_as_the_lora_checkpoint(models, tmp_path, in_process):
    # The LoRA checkpoint's adapter exported in PEFT's format, on the full-weight trainer
    # checkpoint of the same base: --adapter works on the in-memory model too.
    adapter = tmp_path / "adapter"
    proc = in_process("tools/export_lora.py", "--ckpt-path", models["lora"], "--save-path", adapter)
    assert proc.returncode == 0, proc.stderr
    assert chat(in_process, models["ckpt"], "--adapter", adapter) == chat(
        in_process, models["lora"]
    )


@pytest.mark.parametrize(
    "form, flags, needles",
    [
        ("ckpt", ("-g", "0:10"), ("-g/--gpu-vram", "trainer checkpoint", TO_HF)),
        ("sharded", ("-r", "8"), ("-r/--cpu-ram", "layer-sharded folder", TO_HF)),
        ("lora", ("--load-in-8bit",), ("--load-in-8bit", "LoRA checkpoint", TO_HF, "--merge-lora")),
        ("lora", ("--adapter", "{adapter}"), ("--adapter", "brings its own adapters")),
    ],
)
def test_flags_that_need_hf_files_are_refused_in_one_line(
    form, flags, needles, models, tmp_path, in_process, cli
):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    flags = [str(adapter) if f == "{adapter}" else f for f in flags]
    proc = in_process(BOT, "--model", models[form], *GREEDY, *flags, log_level="WARNING")
    cli.assert_one_line_error(proc, *needles)


def test_a_damaged_checkpoint_or_unknown_architecture_is_one_line(
    models, tmp_path, in_process, cli
):
    damaged = tmp_path / "damaged"
    shutil.copytree(models["ckpt"], damaged)
    with open(damaged / "checkpoint_2" / "layer_00001.safetensors", "r+b") as f:
        f.truncate(64)
    proc = in_process(BOT, "--model", damaged / "checkpoint_2", *GREEDY, log_level="WARNING")
    cli.assert_one_line_error(proc, "--model", "incomplete trainer checkpoint")
    bert = tmp_path / "bert"
    shutil.copytree(models["sharded"], bert)
    manifest = json.loads((bert / "manifest.json").read_text())
    (bert / "manifest.json").write_text(json.dumps({**manifest, "architecture": "bert"}))
    proc = in_process(BOT, "--model", bert, *GREEDY, log_level="WARNING")
    cli.assert_one_line_error(proc, "bert")


def test_serve_loads_through_the_same_loader(models, tmp_path, in_process, cli):
    # serve.py's --model goes through the same loader: a damaged checkpoint is the same one line
    # (naming --model), before any server starts.
    damaged = tmp_path / "damaged"
    shutil.copytree(models["ckpt"] / "checkpoint_2", damaged)
    with open(damaged / "layer_00000.safetensors", "r+b") as f:
        f.truncate(64)
    proc = in_process("inference/serve.py", "--model", damaged, "--device", "cpu")
    cli.assert_one_line_error(proc, "--model", "incomplete trainer checkpoint")
