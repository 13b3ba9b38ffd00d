"""LoRA settings and adapter injection: peft's adapters on a pipeline stage's layers.

`peft` makes the adapters: its `LoraConfig` and `inject_adapter_in_model` on each stage's
modules (the base weights are frozen, only `lora_A` / `lora_B` (and biases with `--lora-bias`)
train). Our adapter tensors keep the stage's global parameter names
(`layers.<i>.self_attn.q_proj.lora_A.default.weight`), so a checkpoint saved under one pipeline
layout loads under another (checkpoint.py); peft_io.py renames them for `PeftModel`.

Importing this module is cheap (torch and peft load on first use), so the trainer's flag checks
can build `LoraSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_NAME = "default"  # peft's name for the one adapter


def quiet_bitsandbytes() -> None:
    """peft imports bitsandbytes, whose CPU backend logs a warning about an optional kernels
    package at import; it is noise for LoRA (no 4-bit kernels are used on CPU)."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclass(frozen=True)
class LoraSettings:
    """What `--lora-*` asks for (r > 0)."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    bias: str = "none"  # none | all | lora_only

    def peft_config(self) -> Any:
        quiet_bitsandbytes()
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias=self.bias,
        )


def linear_module_names(config: Any) -> list[str]:
    """Names of the nn.Linear modules inside one transformer layer of this architecture (what
    `--lora-target-modules` can name), from a layer built on the meta device."""
    import torch
    from torch import nn

    from openchatkit.models.arch import prepare_config
    from openchatkit.models.registry import get_architecture

    arch = get_architecture(config.model_type)
    with torch.device("meta"):
        layer = arch.build_layer(prepare_config(config, arch), 0)
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def check_targets(config: Any, targets: tuple[str, ...]) -> None:
    """UserError naming the layer's linear modules when a target matches none (peft matches a
    target against a module name exactly or as its last dotted part(s))."""
    names = linear_module_names(config)
    for target in targets:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            raise UserError(
                f"--lora-target-modules {target!r} matches no linear module of a "
                f"{config.model_type} layer; its linear modules are: {', '.join(names)}"
            )


def apply_lora(stage: nn.Module, settings: LoraSettings, seed: int = 0) -> None:
    """Inject adapters into the stage's layers in place; everything else is frozen.

    Adapters start as peft starts them (A random, B zero), so the adapted model begins equal to
    the base. Each layer's draws come from a generator seeded by `seed` and the layer's global
    index, so every pipeline layout starts from the same adapters. peft's input dropout becomes
    `LoraDropout` (the same law, ~3x faster on CPU; openchatkit/models/lora/dropout.py)."""
    import torch

    quiet_bitsandbytes()
    from peft import inject_adapter_in_model

    from openchatkit.models.lora.dropout import use_fast_dropout

    config = settings.peft_config()
    state = torch.random.get_rng_state()
    try:
        for index, layer in stage.layers.items():
            torch.manual_seed(seed * 100_003 + int(index))
            inject_adapter_in_model(config, layer, adapter_name=ADAPTER_NAME)
            use_fast_dropout(layer)
    finally:
        torch.random.set_rng_state(state)
    for name, param in stage.named_parameters():
        param.requires_grad = is_adapter_param(name, settings.bias)


def is_adapter_param(name: str, bias: str = "none") -> bool:
    """Whether a stage parameter trains under LoRA: the adapter matrices, and biases as
    `--lora-bias` says (all: every bias; lora_only: the biases of adapted modules)."""
    if ".lora_" in name:
        return True
    if name.endswith(".bias"):
        return bias == "all" or (bias == "lora_only" and ".base_layer." in name)
    return False


def adapter_state(stage: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The stage's trainable adapter tensors by global name (CPU copies)."""
    return {
        n: p.detach().to("cpu").clone()
        for n, p in stage.named_parameters()
        if is_adapter_param(n, bias)
    }
