"""Mixed precision: fp32 master weights for fp16/bf16 models, and fp16's dynamic loss scale.

fp32: the optimizer updates the model's own parameters.
fp16/bf16: the model runs in half precision; each parameter has an fp32 master copy that the
optimizer updates, copied back to the model after every step. fp16 also multiplies the loss by
a dynamic scale (halved and the step skipped on overflow, doubled after `window` clean steps);
bf16 has fp32's range and needs none.
"""

from __future__ import annotations

from typing import Any

import torch

from openchatkit.errors import UserError

# Native bf16 tensor cores start at compute capability 8.0 (Ampere). `is_bf16_supported()`
# also says yes on V100/T4 (sm70/sm75), where bf16 is emulated: slow, or a cuBLAS error.
BF16_MIN_CAPABILITY = (8, 0)


def native_bf16(device: torch.device | int | None = None) -> bool:
    """Whether the CUDA device has native bf16 (compute capability >= 8.0)."""
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def check_bf16_device(precision: str, device: torch.device) -> None:
    """Refuse --bf16 on a GPU without native bf16 (one line, naming the flag and the GPU)."""
    if precision != "bf16" or device.type != "cuda" or native_bf16(device):
        return
    major, minor = torch.cuda.get_device_capability(device)
    raise UserError(
        f"--bf16 needs a GPU with compute capability >= 8.0 (Ampere or newer); "
        f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use --fp16"
    )


def qlora_compute_dtype(device: torch.device, dtype: torch.dtype, trains_bias: bool) -> torch.dtype:
    """QLoRA's compute dtype: bf16 for an fp32 run on a GPU with native bf16, else the run's.
    Not with trained biases: bitsandbytes casts a 4-bit linear's bias to the compute dtype in
    place, which would make a trained fp32 bias bf16."""
    if device.type == "cuda" and dtype == torch.float32 and not trains_bias and native_bf16(device):
        return torch.bfloat16
    return dtype


class LossScaler:
    """Dynamic loss scale (fp16) or the constant 1.0 (fp32/bf16, `enabled=False`)."""

    def __init__(self, enabled: bool, initial_scale: float = 2.0**16, window: int = 1000):
        self.enabled = enabled
        self.scale = float(initial_scale) if enabled else 1.0
        self.window = window
        self.good_steps = 0  # clean steps since the last change of scale
        self.skipped_steps = 0

    def update(self, overflow: bool) -> None:
        """Record one step's outcome: halve on overflow, grow after `window` clean steps."""
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "scale": self.scale,
            "window": self.window,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if state.get("enabled"):
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])
            self.skipped_steps = int(state.get("skipped_steps", 0))


class MasterWeights:
    """Pairs each trainable model parameter with the tensor the optimizer updates.

    `names[i]` is the layout-independent parameter name of `model_params[i]`; `params[i]` is the
    fp32 master (or the model parameter itself in fp32).
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]]):
        self.names = [n for n, _ in named_params]
        self.model_params = [p for _, p in named_params]
        self.uses_master = any(p.dtype != torch.float32 for p in self.model_params)
        if self.uses_master:
            self.params = [
                torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params
            ]
        else:
            self.params = list(self.model_params)

    def grads_to_master(self) -> None:
        """Move the model's half-precision gradients onto the fp32 masters (zeros if none)."""
        if not self.uses_master:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        for m, p in zip(self.params, self.model_params, strict=True):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            p.grad = None

    @torch.no_grad()
    def model_to_master(self) -> None:
        """Copy the model's values into the masters (in place: the optimizer keeps them)."""
        if self.uses_master:
            for m, p in zip(self.params, self.model_params, strict=True):
                m.copy_(p)

    @torch.no_grad()
    def master_to_model(self) -> None:
        if self.uses_master:
            for m, p in zip(self.params, self.model_params, strict=True):
                p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
        if self.uses_master:
            for m in self.params:
                m.grad = None

    def master_state(self) -> dict[str, torch.Tensor]:
        """fp32 masters by name (empty in fp32, where the model weights are the masters)."""
        if not self.uses_master:
            return {}
        # Copied to host memory (not cloned on the device): saving must not need more GPU memory.
        return {
            n: m.detach().to("cpu", copy=True) for n, m in zip(self.names, self.params, strict=True)
        }

    @torch.no_grad()
    def load_master_state(self, masters: dict[str, torch.Tensor], alias: dict[str, str]) -> int:
        """Load saved fp32 masters by name (alias maps a name to the one it was saved under)."""
        if not self.uses_master:
            return 0
        loaded = 0
        for n, m in zip(self.names, self.params, strict=True):
            key = n if n in masters else alias.get(n)
            if key is not None and key in masters:
                m.copy_(masters[key])
                loaded += 1
        self.master_to_model()
        return loaded
