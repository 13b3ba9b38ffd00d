"""FastRMSNorm: HF's LlamaRMSNorm values and gradients in fp32 with nothing new kept, HF's own
forward in half precision, and the swap the trainer makes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from openchatkit.models.norm import FastRMSNorm, use_fast_rms_norm
from openchatkit.training.memory_probe import LiveBytes


def pair(dtype=torch.float32, hidden=48):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    nn.init.normal_(ref.weight, 1.0, 0.2)
    fast = LlamaRMSNorm(hidden, eps=1e-5)
    fast.load_state_dict(ref.state_dict())
    assert use_fast_rms_norm(fast) == 1 and type(fast) is FastRMSNorm
    return ref.to(dtype), fast.to(dtype)


def forward_backward(norm, x, grad):
    x = x.clone().requires_grad_()
    y = norm(x)
    y.backward(grad)
    weight_grad = norm.weight.grad.clone() if norm.weight.grad is not None else None
    norm.zero_grad()
    return y.detach(), x.grad, weight_grad


@pytest.mark.parametrize("train_weight", [True, False])
def test_fp32_values_and_gradients_equal_hf(train_weight):
    ref, fast = pair()
    for m in (ref, fast):
        m.weight.requires_grad_(train_weight)
    x, grad = torch.randn(3, 11, 48) * 4, torch.randn(3, 11, 48)
    got, want = forward_backward(fast, x, grad), forward_backward(ref, x, grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    if train_weight:
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    else:
        assert got[2] is None and want[2] is None


def test_half_precision_is_hfs_own_forward():
    ref, fast = pair(torch.bfloat16)
    x, grad = torch.randn(2, 5, 48, dtype=torch.bfloat16), torch.randn(2, 5, 48).bfloat16()
    got, want = forward_backward(fast, x, grad), forward_backward(ref, x, grad)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_fp32_keeps_only_one_value_per_row():
    ref, fast = pair()
    x = torch.randn(4, 32, 48, requires_grad=True)
    kept = {}
    for name, norm in (("hf", ref), ("fast", fast)):
        with LiveBytes(exclude=[x, *norm.parameters()]) as probe:
            y = norm(x)
            kept[name] = probe.live - y.numel() * 4  # what the graph keeps beside the output
            del y
    assert kept["fast"] == 4 * 32 * 4  # 1 / rms, one fp32 per row
    assert kept["hf"] >= x.numel() * 4  # the normalised copy x * r


def test_only_llama_rms_norms_are_swapped():
    model = nn.Sequential(LlamaRMSNorm(8), nn.LayerNorm(8), nn.Sequential(LlamaRMSNorm(8)))
    assert use_fast_rms_norm(model) == 2
    assert [type(m).__name__ for m in model.modules()][1:] == [
        "FastRMSNorm", "LayerNorm", "Sequential", "FastRMSNorm",
    ]  # fmt: skip
    assert use_fast_rms_norm(model) == 0  # already swapped
