"""Linear layers with oneDNN-packed weights, for fp32 and bf16 inference on an x86-64 CPU.

PyTorch runs a float32 `nn.Linear` on the CPU through MKL's sgemm. The chat and serving paths
multiply a few rows at a time (1 row per decode step in the bot, 8 in a server step with 8
clients) by weights that do not fit in the caches, and there MKL reads the weights far below the
machine's memory bandwidth; on AMD CPUs MKL also runs only its AVX2 code. oneDNN with the weight
reordered once into its blocked layout (what inductor's freezing pass and Intel's extension for
PyTorch do) ran the embedded SmolLM2-135M's 210 layer matrices 1.2-1.6x and its head 2.0-2.7x
faster for 1-8 rows on an AMD EPYC (benchmarks/RESULTS.md, 2026-12-07 fourth session), with the
same greedy tokens. bfloat16 already runs through oneDNN, with the weight in its plain layout:
packed, 1.09x in the server's engine and 1.22x per bot turn (same tokens).

`pack_linears(model)` swaps every plain `nn.Linear` of a float32 or bfloat16 model on the CPU for a
`PackedLinear` and returns how many it swapped. 0 where it does not apply: another device (or a
model spread over devices), another dtype, bf16 where oneDNN has no bf16 kernels for this CPU, not
x86-64, an architecture outside the kit's registry (some, e.g. Mamba, read a linear layer's
`.weight` in their forward), a PEFT adapter on top (its layers read their base layer's `.weight`),
or `OPENCHATKIT_PACKED_LINEAR=0` in the environment (measured on AMD only: the way back if another
CPU runs it slower). The packed model is for inference only: it has no gradients, its state dict
lacks the packed weights, and it cannot be moved to another device. A head tied to the input
embeddings gets its own packed copy (vocabulary x hidden x 4 bytes more in fp32: 113 MB for
SmolLM2). Results equal `nn.Linear`'s up to the order of the fp32 sums (relative 1e-6; bf16
products are summed in fp32 either way).
"""

from __future__ import annotations

import os
import platform

import torch
from torch import nn

from openchatkit.models.registry import supported_model_types

X86_64 = {"x86_64", "amd64"}  # platform.machine(): Linux, Windows
PACKED_DTYPES = (torch.float32, torch.bfloat16)
OPT_OUT_ENV = "OPENCHATKIT_PACKED_LINEAR"


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (fp32 or bf16, CPU, no autograd)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # Plain attributes, not parameters or buffers: an opaque oneDNN tensor has no place in a
        # state dict or in `.to()`.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in_features] -> [..., out_features]; oneDNN takes any leading shape.
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def can_pack(model: nn.Module) -> bool:
    """True where `pack_linears` swaps layers (see the module's docstring)."""
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return False
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype not in PACKED_DTYPES:
        return False
    if getattr(model, "hf_device_map", None):
        return False  # spread by accelerate (-g/-r): its hooks wrap the layers' forward
    if getattr(getattr(model, "config", None), "model_type", None) not in supported_model_types():
        return False
    if first.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() not in X86_64:
        return False  # measured on x86-64 only
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    return not any(type(m).__module__.startswith("peft") for m in model.modules())


def pack_linears(model: nn.Module) -> int:
    """Swap the `nn.Linear` layers of a float32 or bfloat16 CPU inference model for
    `PackedLinear`; returns how many were swapped.

    Memory: transformers loads safetensors weights as views of one memory-mapped file, which
    stays mapped while any view lives, so packed layers alone would leave the file's pages
    resident beside their packed copies. Once the layers are packed, the parameters and buffers
    left (embeddings, norms) are copied out of it so the mapping goes. Embedded model, fp32:
    resident 1428 MB right after packing (the file's clean, reclaimable pages and the packed
    copies), 1032 MB after the copy against 944 MB unpacked, both after a forward (the
    difference: the tied head's packed copy); peak 1535 MB while packing (benchmarks/RESULTS.md,
    2026-12-07 fourth session).
    """
    if not can_pack(model):
        return 0
    names = [
        name
        for name, module in model.named_modules()
        # Exact type: subclasses (bitsandbytes' int8 layers, PEFT's) compute otherwise.
        if type(module) is nn.Linear
        and module.weight.dtype in PACKED_DTYPES
        and module.weight.device.type == "cpu"
    ]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, PackedLinear(getattr(parent, leaf)))
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()  # same objects: ties between them are kept
    return len(names)
