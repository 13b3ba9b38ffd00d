"""QLoRA's base: a stage's linear layers as bitsandbytes NF4 (4-bit) weights with bf16 compute.

CUDA only (bitsandbytes' NF4 matmul kernels); the trainer refuses `--load-in-4bit` elsewhere
before this is reached. peft puts its LoRA layers on top of `bnb.nn.Linear4bit` modules itself.
Not run in this project's CI (no GPU): the path follows bitsandbytes' and peft's documented use.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def quantize_linear_4bit(stage: nn.Module, keep: Iterable[str] = ()) -> int:
    """Replace every nn.Linear inside the stage's transformer layers by an NF4 `Linear4bit`
    holding the same weights (the embeddings and the LM head stay as they are); returns how many
    were replaced. `keep` is accepted for symmetry with LoRA's targets: adapted modules are
    quantized too, as in QLoRA."""
    import bitsandbytes as bnb
    import torch

    del keep
    replaced = 0
    for layer in stage.layers.values():
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                module.weight.data.to("cpu"), requires_grad=False, quant_type="nf4"
            )
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data, requires_grad=False)
            q = q.to(module.weight.device if module.weight.device.type == "cuda" else "cuda")
            setattr(parent, name.rsplit(".", 1)[-1], q)
            replaced += 1
    return replaced
