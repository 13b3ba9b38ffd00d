"""A LoRA trainer checkpoint merged into full HF weights is one function
(`openchatkit/models/lora/merge.py` merge_checkpoint_to_hf): `tools/convert_to_hf.py --merge-lora`
and `tools/export_gguf.py` (its HF source for a LoRA checkpoint) write the same tensors, and
those are the base's with W + (alpha/r) B A in every adapted matrix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.inference.test_bot_any_model import build_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("lora_merge"))


def test_converter_and_gguf_export_merge_the_same_weights(models, tmp_path, in_process):
    from openchatkit.export.gguf import hf_source
    from openchatkit.models.lora import read_adapter_checkpoint

    merged = tmp_path / "merged"
    proc = in_process("tools/convert_to_hf.py", "--ckpt-path", models["lora"], "--merge-lora",
                      "--save-path", merged)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ours = load_file(merged / "model.safetensors")
    with hf_source(str(models["lora"]), None, tmp_path) as hf_dir:
        exported = load_file(hf_dir / "model.safetensors")
    assert sorted(exported) == sorted(ours)
    for key, tensor in ours.items():
        assert torch.equal(exported[key], tensor), key
    assert not list(tmp_path.glob(".export-gguf-*"))  # the work folder is gone
    # Against the base: q_proj and v_proj moved by (alpha/r) B A, nothing else did.
    base = load_file(models["hf"] / "model.safetensors")
    _, _, settings, tensors = read_adapter_checkpoint(models["lora"])
    scale = settings.alpha / settings.r
    for key, tensor in base.items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            stem = key.removeprefix("model.").removesuffix(".weight")
            a = tensors[f"{stem}.lora_A.default.weight"]
            b = tensors[f"{stem}.lora_B.default.weight"]
            torch.testing.assert_close(ours[key], tensor + scale * b @ a, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(ours[key], tensor), key
