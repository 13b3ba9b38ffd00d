"""LoraDropout: the law of torch's dropout (drop rate, scale, unbiased), the default generator's
determinism (seed, saved RNG state, activation checkpointing's recompute), and its place in
peft's adapters after `apply_lora`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from openchatkit.models.lora.dropout import LEVELS, LoraDropout, dropout_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drop_rate_scale_and_expectation(p):
    torch.manual_seed(0)
    n = 2_000_003  # not a multiple of 4: the last word is partly used
    x = torch.rand(n) + 0.5
    y = LoraDropout(p).train()(x)
    dropped = y == 0
    q = round(p * LEVELS) / LEVELS  # the quantised rate, within 7.6e-6 of p
    assert abs(q - p) <= 0.5 / LEVELS
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(dropped.float().mean().item() - q) < 5 * sigma
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / (1 - q))
    # Unbiased: E[y] = x. On a constant input the mean's error is the drop rate's, scaled.
    ones = torch.ones(n)
    assert abs(LoraDropout(p).train()(ones).mean().item() - 1) < 5 * sigma / (1 - q)


@pytest.mark.parametrize("p", [0.5, 1 / 16, 0.3])
def test_bits_are_uniform_and_independent_of_position(p):
    """Each of the four 16-bit slices of a word drops at the same rate (no slice is biased, e.g.
    by a sign bit that random_ without a full range leaves at 0). p = 0.5 looks at each slice's
    top bit, 1/16 at its top four bits, 0.3 at all of them."""
    torch.manual_seed(1)
    mask = dropout_mask(torch.Size([4 * 500_000]), p, torch.float32).view(-1, 4)
    rates = (mask == 0).float().mean(0)
    q = round(p * LEVELS) / LEVELS
    assert torch.all((rates - q).abs() < 5 * (q * (1 - q) / 500_000) ** 0.5), rates


def test_threshold_is_exact_at_the_smallest_rate():
    """p = 1/65536 drops exactly the one 16-bit value -32768: ~64 of 2^22 elements. An
    off-by-one in the comparison would drop two values (~128) or none."""
    torch.manual_seed(2)
    n = 1 << 22
    drops = int((dropout_mask(torch.Size([n]), 1 / LEVELS, torch.float32) == 0).sum())
    assert 64 - 5 * 8 < drops < 64 + 5 * 8, drops


def test_same_seed_same_mask_and_eval_is_identity():
    x = torch.randn(3, 5, 7)
    drop = LoraDropout(0.3).train()
    torch.manual_seed(7)
    a = drop(x)
    state = torch.get_rng_state()
    b = drop(x)
    torch.set_rng_state(state)
    assert torch.equal(drop(x), b) and not torch.equal(a, b)
    torch.manual_seed(7)
    assert torch.equal(drop(x), a)
    assert drop.eval()(x) is x
    assert LoraDropout(0.0).train()(x) is x


def test_gradient_is_the_mask():
    torch.manual_seed(3)
    x = torch.randn(64, 33, requires_grad=True)
    drop = LoraDropout(0.2).train()
    y = drop(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, y.detach() / x.detach())


def test_activation_checkpointing_recomputes_the_same_mask():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    drop = LoraDropout(0.25).train()
    x = torch.randn(8, 16, requires_grad=True)

    def block(t):
        return torch.tanh(lin(drop(t)))

    grads = []
    for wrap in (False, True):
        torch.manual_seed(11)
        lin.zero_grad()
        x.grad = None
        out = checkpoint(block, x, use_reentrant=False) if wrap else block(x)
        out.square().sum().backward()
        grads.append((x.grad.clone(), lin.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_extreme_rates_fall_back_to_torch():
    """p' = 0 or 1 after quantising: torch's dropout (no silent change of the rate)."""
    with pytest.raises(ValueError, match="quantises"):
        dropout_mask(torch.Size([4]), 1e-7, torch.float32)
    torch.manual_seed(0)
    x = torch.ones(1000)
    assert torch.equal(LoraDropout(1e-7).train()(x), x / (1 - 1e-7))


def test_apply_lora_swaps_peft_dropout():
    from types import SimpleNamespace

    from openchatkit.models.lora import LoraSettings, apply_lora

    stage = nn.Module()
    layer = nn.Module()
    layer.q_proj, layer.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
    stage.layers = nn.ModuleDict({"0": layer})
    stage.config = SimpleNamespace()
    apply_lora(stage, LoraSettings(r=2, alpha=4, dropout=0.1, target_modules=("q_proj", "v_proj")))
    drops = [m for m in stage.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(type(d) is LoraDropout and d.p == 0.1 for d in drops)
    assert all(".lora_" in n for n, p in stage.named_parameters() if p.requires_grad)
    # With dropout 0 peft puts nn.Identity in lora_dropout: nothing to swap.
    stage0 = nn.Module()
    stage0.layers = nn.ModuleDict({"0": nn.Module()})
    stage0.layers["0"].q_proj = nn.Linear(8, 8)
    apply_lora(stage0, LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",)))
    assert use_fast_dropout(stage0) == 0
    assert not any(isinstance(m, nn.Dropout) for m in stage0.modules())
    # Only peft's lora_dropout dicts are touched, not a model's own dropout.
    assert use_fast_dropout(nn.Sequential(nn.Dropout(0.5))) == 0


def test_inplace_writes_into_the_input():
    torch.manual_seed(4)
    x = torch.ones(1000)
    y = LoraDropout(0.5, inplace=True).train()(x)
    assert y.data_ptr() == x.data_ptr() and (x == 0).any() and (x > 1).any()
