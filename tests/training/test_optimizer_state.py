"""Optimizer state by parameter name (so a checkpoint resumes under another layout, a tied copy
taking the embedding's state) and the 8-bit optimizers on CPU."""

from __future__ import annotations

import pytest
import torch

from openchatkit.training.optim import (
    build_optimizer,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)


def test_optimizer_state_by_name_maps_a_tied_copy_to_the_embedding():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    a.grad, b.grad = torch.full((3,), 0.5), torch.full((2,), 2.0)
    opt.step()
    saved = optimizer_state_by_name(opt, ["embed.w", "head.lm"], skip={"head.lm"})
    assert set(saved) == {"embed.w"}
    # Another layout: a stage holding only the head copy takes the embedding's state.
    c = torch.nn.Parameter(torch.ones(3))
    opt2 = torch.optim.AdamW([c], lr=0.1)
    missing = load_optimizer_state_by_name(opt2, ["head.lm"], saved, {"head.lm": "embed.w"})
    assert missing == []
    assert torch.equal(opt2.state[c]["exp_avg"], opt.state[a]["exp_avg"])


def test_paged_8bit_adam_is_8bit_adam_on_cpu_and_keeps_its_state_on_resume():
    """On CPU there is no paging: paged-8bit-adam builds bitsandbytes' AdamW8bit (not its
    paged class, which would warn on every run) and makes the same update bit for bit; state
    saved under one name loads under the other."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    init = torch.randn(64, 128)  # 8192 elements: above bitsandbytes' 8-bit size (4096)
    grads = [torch.randn(64, 128) for _ in range(3)]
    runs = {}
    for name in ("8bit-adam", "paged-8bit-adam"):
        w = torch.nn.Parameter(init.clone())
        opt = build_optimizer([w], name, 1e-2, 0.0)
        assert type(opt) is bnb.optim.AdamW8bit and not getattr(opt, "is_paged", False)
        for g in grads[:2]:
            w.grad = g.clone()
            opt.step()
        runs[name] = (w, opt)
    assert torch.equal(runs["8bit-adam"][0], runs["paged-8bit-adam"][0])
    assert runs["8bit-adam"][1].state[runs["8bit-adam"][0]]["state1"].dtype == torch.uint8
    # Resume the 8-bit run's state under the paged name: the third step matches.
    saved = optimizer_state_by_name(runs["8bit-adam"][1], ["w"], skip=set())
    w2 = torch.nn.Parameter(runs["8bit-adam"][0].detach().clone())
    opt2 = build_optimizer([w2], "paged-8bit-adam", 1e-2, 0.0)
    assert load_optimizer_state_by_name(opt2, ["w"], saved, {}) == []
    for w, opt in ((runs["8bit-adam"][0], runs["8bit-adam"][1]), (w2, opt2)):
        w.grad = grads[2].clone()
        opt.step()
    assert torch.equal(w2, runs["8bit-adam"][0])
