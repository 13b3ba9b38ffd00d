"""The step's numbers, tested alone: the LR schedule, the fp16 loss scale and the loss
normalisation by the global token count."""

from __future__ import annotations

import torch

from openchatkit.training.engine import TokenMeanLoss, count_target_tokens
from openchatkit.training.optim import (
    lr_factor,
)
from openchatkit.training.precision import LossScaler


def test_lr_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 2, 6) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(0, 0, 4) == 1.0 and lr_factor(4, 0, 4) == 0.0
    assert [lr_factor(s, 2, 6, "constant") for s in range(7)] == [0.0, 0.5] + [1.0] * 5


def test_loss_scale_halves_on_overflow_and_grows_after_a_window():
    s = LossScaler(True, 1024.0, window=2)
    s.update(overflow=True)
    assert s.scale == 512.0 and s.skipped_steps == 1
    s.update(False)
    s.update(False)
    assert s.scale == 1024.0
    t = LossScaler(True, 1.0, window=2)  # the window comes from the flag, not the checkpoint
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert LossScaler(False).scale == 1.0


def test_loss_is_normalised_by_the_global_token_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3] = -100
    n = count_target_tokens(labels)
    assert n == 7  # 2 x 4 shifted targets, one masked
    fn = TokenMeanLoss()
    fn.normalizer = float(n)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(fn(logits, labels), ref)
    # Two halves, each divided by the whole count, sum to the mean over the whole batch.
    halves = fn(logits[:1], labels[:1]) + fn(logits[1:], labels[1:])
    assert torch.allclose(halves, ref)
    fn.scale = 8.0
    assert torch.allclose(fn(logits, labels), 8 * ref)
