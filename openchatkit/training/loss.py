"""The last stage's loss with the final norm and LM head inside it, recomputed in the backward.

Under GPipe the last stage runs every micro-batch's forward before any backward. If its output
were the logits, each micro-batch in flight would keep them (B, S, V) in the model dtype plus
the fp32 log-softmax the cross-entropy saves: for GPT-NeoX-20B (V = 50432, 2048 tokens) 0.6 GB
per micro-batch, 40 GB for 64. With `HeadLoss` the stage returns its hidden state (B, S, H),
and the loss applies the head and the cross-entropy under non-reentrant checkpointing: a
micro-batch keeps only that hidden state, and the logits exist for one micro-batch at a time
(in its forward, and again in its backward). The cost is one more LM-head matmul per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class HeadLoss:
    """`loss(head(hidden), labels)`, recomputed in the backward. `normalizer` and `scale`
    are those of the wrapped loss (the engine sets them before each step)."""

    def __init__(self, head: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.head = head
        self.loss = loss

    @property
    def normalizer(self) -> float:
        return self.loss.normalizer

    @normalizer.setter
    def normalizer(self, value: float) -> None:
        self.loss.normalizer = value

    @property
    def scale(self) -> float:
        return self.loss.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.loss.scale = value

    def _compute(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.head(hidden), labels)

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: nothing to keep
            return self._compute(hidden, labels)
        return checkpoint(self._compute, hidden, labels, use_reentrant=False)


def move_head_into_loss(stage: nn.Module, loss: Callable) -> HeadLoss:
    """Make a last `StageModel` return hidden states and compute its head inside the loss."""
    stage.head_in_loss = True
    return HeadLoss(stage.head, loss)
