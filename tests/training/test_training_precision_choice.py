"""GPU-only decisions checked on CPU by monkeypatching torch.cuda (review gpu-paths items 8 and
9): bf16 by compute capability, not by `is_bf16_supported()` (which says yes through emulation
on V100/T4); --bf16 refused below sm80; MFU with 4 FLOPs per frozen weight under LoRA and the
TF32 peak for fp32 runs."""

from __future__ import annotations

import pytest
import torch

from openchatkit.errors import UserError
from openchatkit.training.metrics import model_flops_per_token, peak_flops, peak_flops_of
from openchatkit.training.precision import check_bf16_device, native_bf16, qlora_compute_dtype

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA device whose capability and name the test sets; is_bf16_supported() says
    yes everywhere, as it does on V100/T4 through emulation."""

    def set_gpu(capability: tuple[int, int], name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    return set_gpu


def test_qlora_computes_in_bf16_only_with_native_bf16(gpu):
    gpu((7, 0), "Tesla V100-SXM2-16GB")
    assert not native_bf16(CUDA)
    assert qlora_compute_dtype(CUDA, torch.float32, trains_bias=False) == torch.float32
    gpu((8, 0), "NVIDIA A100-SXM4-80GB")
    assert native_bf16(CUDA)
    assert qlora_compute_dtype(CUDA, torch.float32, trains_bias=False) == torch.bfloat16
    # A trained bias stays fp32; a half-precision run keeps its dtype; CPU never changes it.
    assert qlora_compute_dtype(CUDA, torch.float32, trains_bias=True) == torch.float32
    assert qlora_compute_dtype(CUDA, torch.float16, trains_bias=False) == torch.float16
    assert qlora_compute_dtype(torch.device("cpu"), torch.float32, False) == torch.float32


@pytest.mark.parametrize(
    "capability,name", [((7, 0), "Tesla V100-SXM2-16GB"), ((7, 5), "Tesla T4")]
)
def test_bf16_is_refused_below_sm80_in_one_line(gpu, capability, name):
    gpu(capability, name)
    with pytest.raises(UserError) as err:
        check_bf16_device("bf16", CUDA)
    message = str(err.value)
    assert "\n" not in message and "--bf16" in message and name in message
    assert f"{capability[0]}.{capability[1]}" in message and "--fp16" in message
    check_bf16_device("fp16", CUDA)  # fp16 and fp32 are fine there
    check_bf16_device("fp32", CUDA)


def test_bf16_is_accepted_from_sm80(gpu):
    for capability in ((8, 0), (8, 9), (9, 0)):
        gpu(capability, "some GPU")
        check_bf16_device("bf16", CUDA)
    check_bf16_device("bf16", torch.device("cpu"))  # CPU bf16 is the user's choice


def test_lora_counts_four_flops_per_frozen_weight():
    n, layers, hidden, seq = 2_600_000_000, 32, 2560, 2048  # RedPajama-3B-like
    adapters = 2_600_000
    full = model_flops_per_token(n, layers, hidden, seq)
    lora = model_flops_per_token(n, layers, hidden, seq, trainable_params=adapters)
    attention = 12.0 * layers * hidden * seq
    assert full == 6.0 * n + attention
    assert lora == 4.0 * (n - adapters) + 6.0 * adapters + attention
    assert 1.4 < full / lora < 1.5  # what the old 6N overstated LoRA's MFU by
    assert model_flops_per_token(n, layers, hidden, seq, trainable_params=n) == full
    with pytest.raises(ValueError):
        model_flops_per_token(n, layers, hidden, seq, trainable_params=n + 1)


def test_fp32_runs_are_measured_against_the_tf32_peak(gpu):
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "fp16") == 989e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(494.5e12)
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(156e12)
    assert peak_flops_of("Tesla V100-SXM2-16GB", "fp32") is None
    with pytest.raises(ValueError):
        peak_flops_of("NVIDIA H100 80GB HBM3", "int8")
    gpu((9, 0), "NVIDIA H100 80GB HBM3")
    assert peak_flops("cuda", "fp32") == pytest.approx(494.5e12)
    assert peak_flops("cpu", "fp32") is None
