"""The last stage's loss with the final norm and LM head inside it.

Two reasons to run the head inside the loss rather than at the end of the stage:

1. Rows without a target. With `--loss-on bot` over half the tokens of a chat (the human turns)
   carry label -100. The head and the cross-entropy then run only on the rows that carry loss
   (the final norm is per token, so this is exact), which saves their FLOPs and memory: the LM
   head is ~20 % of SmolLM2-135M's FLOPs. HF computes every row's logits and drops them.
2. Recomputation. Under GPipe the last stage runs every micro-batch's forward before any backward. If its output
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
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class HeadLoss:
    """`loss(head(hidden), labels)`, on the rows that carry a target when `select_rows`, and
    recomputed in the backward when `recompute`. `normalizer` and `scale` are those of the
    wrapped `TokenMeanLoss` (the engine sets them before each step)."""

    def __init__(self, head: nn.Module, loss, *, recompute: bool, select_rows: bool):
        self.head = head
        self.loss = loss
        self.recompute = recompute
        self.select_rows = select_rows

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
        if not self.select_rows:
            return self.loss(self.head(hidden), labels)
        target = shifted_targets(labels)  # (B*S,)
        keep = (target != -100).nonzero().squeeze(1)  # (M,) rows that carry loss
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (M, H)
        return self.loss.on_rows(self.head(rows), target.index_select(0, keep))

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.recompute or not torch.is_grad_enabled():  # evaluation: nothing to keep
            return self._compute(hidden, labels)
        return checkpoint(self._compute, hidden, labels, use_reentrant=False)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) labels -> (B*S,) targets: position t predicts token t+1, the last position of a
    row predicts nothing (-100). Shifting the labels instead of the logits avoids copying a
    (B, S-1, V) slice."""
    return F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)


def move_head_into_loss(
    stage: nn.Module, loss: Callable, *, recompute: bool, select_rows: bool
) -> HeadLoss:
    """Make a last `StageModel` return hidden states and compute its head inside the loss."""
    stage.head_in_loss = True
    return HeadLoss(stage.head, loss, recompute=recompute, select_rows=select_rows)
