"""The LM head fused into the cross-entropy (`openchatkit/training/loss.py`): the same loss and
gradients as `F.cross_entropy(F.linear(h, W, b).float())`, one (N, V) buffer less, and the
unfused fallback for an adapted head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openchatkit.training.engine import TokenMeanLoss
from openchatkit.training.loss import HeadLoss, linear_cross_entropy
from openchatkit.training.memory_probe import LiveBytes

N, H, V = 48, 32, 300


def inputs(dtype, bias, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * scale).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    target[::7] = -100
    return h, w, b, target


def loss_and_grads(fused, h, w, b, target, grad_scale=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    if fused:
        loss = linear_cross_entropy(h, w, b, target)
    else:
        logits = F.linear(h, w, b).float()
        loss = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_loss_and_gradients_equal_head_plus_cross_entropy(dtype, bias):
    args = inputs(dtype, bias)
    # fp16 runs with a loss scale: the gradient must be scaled before it is rounded to fp16.
    scale = 2.0**10 if dtype == torch.float16 else 3.0
    ref = loss_and_grads(False, *args, grad_scale=scale)
    got = loss_and_grads(True, *args, grad_scale=scale)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    for name, a, r in zip(["hidden", "weight", "bias"], got[1:], ref[1:], strict=True):
        if r is None:
            assert a is None
            continue
        assert a.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)
        else:  # one rounding to the half type, as unfused: a unit in the last place or two
            atol = 2.0**-8 * r.abs().max().item()
            torch.testing.assert_close(a.float(), r.float(), rtol=0, atol=atol, msg=name)
        assert a.abs().sum() > 0 and torch.isfinite(a).all(), name


def test_fused_loss_is_stable_for_large_logits_and_ignores_masked_rows():
    h, w, b, target = inputs(torch.float32, bias=True, scale=300.0)  # logits ~1e4
    ref, got = loss_and_grads(False, h, w, b, target), loss_and_grads(True, h, w, b, target)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1:])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-4)
    # Rows with target -100 get no gradient; with every row masked the loss is 0.
    assert got[1][::7].abs().max() == 0
    none = loss_and_grads(True, h, w, b, torch.full_like(target, -100))
    assert none[0] == 0 and all((g == 0).all() for g in none[1:])


def test_fused_loss_needs_one_fp32_buffer_of_logits_where_cross_entropy_needs_three():
    # As under LoRA: the head's weight is frozen, the hidden state needs its gradient.
    h, w, _, target = inputs(torch.float32, bias=False)
    h.requires_grad_()
    peak = {}
    for fused in (False, True):
        with LiveBytes(exclude=[h, w, target]) as probe:
            if fused:
                loss = linear_cross_entropy(h, w, None, target)
            else:
                loss = F.cross_entropy(h @ w.t(), target, ignore_index=-100, reduction="sum")
            loss.backward()
            del loss
            peak[fused] = probe.peak
    logits = N * V * 4
    # Unfused: the log-softmax beside the logits in the forward; in the backward the saved
    # log-softmax, the zero-filled NLL gradient and the log-softmax's input gradient.
    assert peak[False] >= 3 * logits
    # Fused: the logits become the softmax in place; the backward makes (N, H) products only.
    assert logits <= peak[True] <= logits + 64 * N + 3 * N * H * 4


class OtherLinear(nn.Linear):
    """Stands for an adapted LM head (any module that is not a plain nn.Linear)."""


class TinyHead(nn.Module):
    def __init__(self, lm_head):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.lm_head = lm_head

    def normalize(self, hidden):
        return self.norm(hidden)

    def forward(self, hidden):
        return self.lm_head(self.normalize(hidden))


@pytest.mark.parametrize("select_rows", [False, True])
def test_head_loss_fuses_a_plain_head_and_falls_back_for_another(select_rows, monkeypatch):
    from openchatkit.training import loss as loss_module

    calls = []

    def counting(*args):
        calls.append(args[0].shape[0])
        return linear_cross_entropy(*args)

    monkeypatch.setattr(loss_module, "linear_cross_entropy", counting)
    torch.manual_seed(0)
    plain = nn.Linear(H, V, bias=False)
    other = OtherLinear(H, V, bias=False)
    other.load_state_dict(plain.state_dict())
    hidden = torch.randn(2, N // 2, H)
    labels = torch.randint(0, V, (2, N // 2))
    labels[:, :5] = -100
    results = []
    for lm_head in (plain, other):
        inner = TokenMeanLoss()
        inner.normalizer, inner.scale = 40.0, 8.0
        fn = HeadLoss(TinyHead(lm_head), inner, recompute=False, select_rows=select_rows)
        x = hidden.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward()
        results.append((loss.detach(), x.grad))
    # The plain head took the fused path once (on the rows with a target when selecting:
    # 2 x (23 - 4): labels 1-4 are masked, the last position predicts nothing); the other
    # head did not.
    assert calls == [38 if select_rows else N]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, -100, 3, 3, -100])
    assert torch.autograd.gradcheck(lambda *a: linear_cross_entropy(*a, target), (h, w, b))
