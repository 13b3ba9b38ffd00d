"""QLoRA's base: a stage's linear layers as bitsandbytes NF4 (4-bit) weights.

peft puts its LoRA layers on top of the `bnb.nn.Linear4bit` modules itself. The compute dtype
is the run's (bf16 on CUDA as in QLoRA; fp32 on CPU, where bitsandbytes >= 0.49 quantizes and
runs NF4 matmuls too, with a slower dequantize-then-matmul path), so CPU tests exercise the
same code a GPU run does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from openchatkit.errors import UserError


def check_4bit_support(device: str) -> None:
    """One line if bitsandbytes cannot quantize to NF4 and run a matmul on `device`. On CUDA
    (bitsandbytes' own kernels) only the import is checked: this runs before each rank picks
    its GPU, and a probe would open a CUDA context on GPU 0 from every rank."""
    try:
        import bitsandbytes as bnb

        if device == "cuda":
            return
        probe = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        probe = probe.to(device)
        with torch.no_grad():
            probe(torch.ones(1, 64, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means "not on this machine"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--load-in-4bit: bitsandbytes cannot run NF4 on {device} here ({reason}); train "
            "LoRA on the full-precision base (leave --load-in-4bit out)"
        ) from None


def quantize_linear_4bit(
    stage: nn.Module, compute_dtype: torch.dtype, keep: Iterable[str] = ()
) -> int:
    """Replace every nn.Linear inside the stage's transformer layers by an NF4 `Linear4bit`
    holding the same weights (the embeddings and the LM head stay as they are), on the device
    the layer is on; returns how many were replaced. `keep` is accepted for symmetry with
    LoRA's targets: adapted modules are quantized too, as in QLoRA."""
    import bitsandbytes as bnb

    del keep
    replaced = 0
    for layer in stage.layers.values():
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            device = module.weight.device
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            # Quantized when moved to its device (bitsandbytes quantizes in `.to`).
            q.weight = bnb.nn.Params4bit(
                module.weight.data.to("cpu"), requires_grad=False, quant_type="nf4"
            )
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data.to("cpu"), requires_grad=False)
            setattr(parent, name.rsplit(".", 1)[-1], q.to(device))
            replaced += 1
    return replaced
