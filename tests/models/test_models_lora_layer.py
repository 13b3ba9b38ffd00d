"""RankScaledLoraLinear: peft's LoRA linear with the scaling on the rank-r intermediate gives
peft's outputs and gradients, falls back to peft's forward outside the plain case, and is what
`apply_lora` installs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from openchatkit.models.lora import LoraSettings, apply_lora
from openchatkit.models.lora_layer import RankScaledLoraLinear, use_rank_scaled_forward


def adapted_stage(dropout=0.0, alpha=32, r=4):
    torch.manual_seed(0)
    stage = nn.Module()
    layer = nn.Module()
    layer.q_proj, layer.o_proj = nn.Linear(24, 40), nn.Linear(40, 24, bias=False)
    stage.layers = nn.ModuleDict({"0": layer})
    stage.config = SimpleNamespace()
    targets = ("q_proj", "o_proj")
    apply_lora(stage, LoraSettings(r=r, alpha=alpha, dropout=dropout, target_modules=targets))
    for name, p in stage.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter's path count
            nn.init.normal_(p)
    return stage, layer


def run(layer, x, peft_forward):
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    cls = PeftLoraLinear if peft_forward else RankScaledLoraLinear
    for m in (layer.q_proj, layer.o_proj):
        m.__class__ = cls
    x = x.clone().requires_grad_()
    y = layer.o_proj(torch.tanh(layer.q_proj(x)))
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    return y.detach(), x.grad, grads


def test_apply_lora_installs_it_and_it_equals_peft():
    stage, layer = adapted_stage()
    assert type(layer.q_proj) is RankScaledLoraLinear and type(layer.o_proj) is RankScaledLoraLinear
    assert layer.q_proj.scaling["default"] == 8.0  # alpha / r: the scaling is really applied
    x = torch.randn(3, 5, 24)
    ours, peft = run(layer, x, False), run(layer, x, True)
    torch.testing.assert_close(ours[0], peft[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], peft[1], rtol=1e-6, atol=1e-5)
    assert set(ours[2]) == set(peft[2]) and len(ours[2]) == 4
    for name, g in ours[2].items():
        torch.testing.assert_close(g, peft[2][name], rtol=1e-6, atol=1e-5, msg=name)
        assert g.abs().sum() > 0, name


def test_same_dropout_masks_as_peft_for_the_same_seed():
    stage, layer = adapted_stage(dropout=0.3)
    x = torch.randn(3, 5, 24)
    torch.manual_seed(5)
    ours = run(layer, x, False)
    torch.manual_seed(5)
    peft = run(layer, x, True)
    torch.testing.assert_close(ours[0], peft[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["merged", "disabled", "other dtype"])
def test_falls_back_to_peft_outside_the_plain_case(case):
    stage, layer = adapted_stage()
    q = layer.q_proj
    x = torch.randn(2, 24)
    if case == "merged":
        expected = q(x)
        q.merge()
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    elif case == "disabled":
        q.enable_adapters(False)
        torch.testing.assert_close(q(x), q.base_layer(x))
    else:  # adapters in float64 on a float32 base: peft casts the input; its forward runs
        q.lora_A.double()
        q.lora_B.double()
        low = q.lora_A["default"](x.double())
        expected = (q.base_layer(x).double() + q.lora_B["default"](low) * 8).float()
        torch.testing.assert_close(q(x), expected)


def test_only_peft_plain_linears_are_swapped():
    assert use_rank_scaled_forward(nn.Sequential(nn.Linear(2, 2))) == 0
    stage, layer = adapted_stage()
    assert use_rank_scaled_forward(stage) == 0  # already swapped: not counted twice
