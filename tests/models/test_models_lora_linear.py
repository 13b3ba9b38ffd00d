"""FastLoraLinear: the same outputs and gradients as peft's `lora.Linear` (same masks from the same
generator), the fused function's gradients by gradcheck, and every case that must stay on peft's
own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from openchatkit.models import lora_linear
from openchatkit.models.dropout import use_fast_dropout
from openchatkit.models.lora_linear import FastLoraLinear, LoraLinearFunction, use_fast_lora_linear


def pair(bias: bool, dropout: float, train_bias: bool = False, out: int = 12):
    """(peft's module, ours) with the same weights: a (.., 10) -> (.., out) LoRA r=3 linear, B
    random so that the adapter contributes, base frozen."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(10, out, bias=bias)
    inject_adapter_in_model(
        LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["proj"]), holder
    )
    use_fast_dropout(holder)
    nn.init.normal_(holder.proj.lora_B["default"].weight)
    for name, param in holder.named_parameters():
        param.requires_grad = "lora_" in name or (train_bias and name.endswith("base_layer.bias"))
    ours = copy.deepcopy(holder)
    assert use_fast_lora_linear(ours) == 1 and type(ours.proj) is FastLoraLinear
    return holder.proj, ours.proj


def run(module, x, seed=5):
    """Forward and backward of a fixed random loss; returns output, grads of x and parameters."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    y = module(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), (x.grad.clone() if x.grad is not None else None), grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("x_grad", [True, False])
def test_matches_peft_in_training(bias, dropout, x_grad, monkeypatch):
    peft_mod, ours = pair(bias, dropout)
    calls = []
    real = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 7, 10).requires_grad_(x_grad)
    want, got = run(peft_mod, x), run(ours, x)
    assert calls, "the fused path was not taken"
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    if x_grad:
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    else:
        assert got[1] is None and want[1] is None
    assert got[2].keys() == want[2].keys() and len(got[2]) == 2
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-6, atol=1e-6)
    if dropout:  # the masks came from the generator: another seed, another output
        assert not torch.allclose(run(ours, x, seed=6)[0], got[0])


def test_trainable_base_bias_and_eval_mode():
    peft_mod, ours = pair(bias=True, dropout=0.1, train_bias=True)
    x = torch.randn(5, 10, requires_grad=True)
    want, got = run(peft_mod, x), run(ours, x)
    assert "base_layer.bias" in got[2]
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-6, atol=1e-6)
    peft_mod.eval(), ours.eval()
    torch.testing.assert_close(ours(x), peft_mod(x), rtol=1e-6, atol=1e-6)
    torch.manual_seed(1)
    a = ours(x)
    assert torch.equal(ours(x), a)  # no dropout in eval


def test_gradcheck_of_the_fused_function():
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(4, 3, 5, dtype=d, requires_grad=True)
    w, b = torch.randn(6, 5, dtype=d), torch.randn(6, dtype=d, requires_grad=True)
    la = torch.randn(2, 5, dtype=d, requires_grad=True)
    lb = torch.randn(6, 2, dtype=d, requires_grad=True)
    mask = (torch.rand(4, 3, 5) > 0.3).to(d) / 0.7
    for m in (mask, None):
        assert torch.autograd.gradcheck(
            lambda *t, m=m: LoraLinearFunction.apply(t[0], w, t[1], t[2], t[3], 1.5, m),
            (x, b, la, lb),
        )


def _fallback_cases():
    def bf16(m, x):
        m.to(torch.bfloat16)
        return x.bfloat16()

    def disabled(m, x):
        m.enable_adapters(False)
        return x

    def merged(m, x):
        m.merge()
        return x

    def base_trains(m, x):
        m.base_layer.weight.requires_grad_(True)
        return x

    def torch_dropout(m, x):
        m.lora_dropout["default"] = nn.Dropout(0.1)
        return x

    def autocast(m, x):
        return x

    return [bf16, disabled, merged, base_trains, torch_dropout, autocast]


@pytest.mark.parametrize("case", _fallback_cases(), ids=lambda f: f.__name__)
def test_other_cases_run_peft_forward(case, monkeypatch):
    """Where the fused node would not be exactly peft's vanilla LoRA in fp32, peft's own forward
    runs: the output then equals peft's module prepared the same way, bit for bit."""
    peft_mod, ours = pair(bias=True, dropout=0.1)
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: pytest.fail("fused path taken"))
    x = torch.randn(3, 10)
    xp, xo = case(peft_mod, x.clone()), case(ours, x.clone())
    ctx = torch.autocast("cpu", torch.bfloat16) if case.__name__ == "autocast" else _null()
    with ctx:
        torch.manual_seed(2)
        want = peft_mod(xp)
        torch.manual_seed(2)
        got = ours(xo)
    assert torch.equal(got, want)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_apply_lora_swaps_every_adapted_linear():
    from types import SimpleNamespace

    from openchatkit.models.lora import LoraSettings, apply_lora

    stage = nn.Module()
    stage.layers = nn.ModuleDict({str(i): nn.Module() for i in range(2)})
    for layer in stage.layers.values():
        layer.q_proj, layer.v_proj, layer.o_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    stage.config = SimpleNamespace()
    apply_lora(stage, LoraSettings(r=2, alpha=4, dropout=0.05, target_modules=("q_proj", "v_proj")))
    kinds = [type(m) for m in stage.modules() if isinstance(m, PeftLoraLinear)]
    assert kinds == [FastLoraLinear] * 4
    assert type(stage.layers["0"].o_proj) is nn.Linear
    assert use_fast_lora_linear(stage) == 0  # already swapped
    assert lora_linear._dropout_rate(nn.Identity()) == 0.0


def test_activation_checkpointing_recomputes_the_same_mask(monkeypatch):
    """Under torch.utils.checkpoint the forward runs twice with the RNG state restored: the
    gradients equal those of a plain run (same masks, same saved tensors)."""
    from torch.utils.checkpoint import checkpoint

    _, ours = pair(bias=True, dropout=0.25)
    x = torch.randn(4, 10, requires_grad=True)
    grads = []
    for wrap in (False, True):
        ours.zero_grad()
        x.grad = None
        torch.manual_seed(9)
        y = checkpoint(ours, x, use_reentrant=False) if wrap else ours(x)
        y.tanh().sum().backward()
        grads.append(
            [x.grad.clone()] + [p.grad.clone() for p in ours.parameters() if p.requires_grad]
        )
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
