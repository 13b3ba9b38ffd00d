"""The last stage's loss, with the final norm and the LM head inside it.

The head runs inside the loss for three reasons:

1. Less work and memory around the logits. `F.cross_entropy(head(h))` allocates an fp32
   log-softmax beside the (N, V) logits in the forward, and in the backward a zero-filled (N, V)
   gradient, the log-softmax's (N, V) input gradient and a second exponential pass.
   `linear_cross_entropy` turns the logits into the unnormalised softmax in place and keeps that.
   In fp32 its backward touches no (N, V) tensor besides the matrix products: the softmax's row
   normalisation and the one-hot target are applied to the (N, H) products instead
   (diag(c) P W = diag(c) (P W)). The loss peaks at one fp32 (N, V) buffer instead of three,
   with the same loss and gradients to fp32 rounding, and head + loss take ~10 % less time on
   CPU (SmolLM2's 49,152-token vocabulary, 512 rows, frozen head: 482 against 539 ms, median of
   9 alternating rounds at 2 threads; ~2 % of a LoRA step, below what a full-step comparison on
   this machine resolves).
2. Rows without a target. With `--loss-on bot` over half the tokens of a chat (the human turns)
   carry label -100. The head and the cross-entropy then run only on the rows that carry loss
   (the final norm is per token, so this is exact), which saves their FLOPs and memory: the LM
   head is ~20 % of SmolLM2-135M's FLOPs. HF computes every row's logits and drops them.
3. Recomputation. Under GPipe the last stage runs every micro-batch's forward before any
   backward. If its output were the logits, each micro-batch in flight would keep them (B, S, V)
   plus the loss's fp32 buffer: for GPT-NeoX-20B (V = 50432, 2048 tokens) 0.6 GB per micro-batch,
   40 GB for 64. With `HeadLoss(recompute=True)` the stage returns its hidden state (B, S, H), and
   the loss applies the head and the cross-entropy under non-reentrant checkpointing: a
   micro-batch keeps only that hidden state, and the logits exist for one micro-batch at a time
   (in its forward, and again in its backward). The cost is one more LM-head matmul per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows with a target of cross_entropy(hidden @ weight.T + bias, target).

    hidden (N, H) and weight (V, H) in the model dtype, bias (V,) or None, target (N,) int64
    with -100 ignored. Returns an fp32 scalar. The logits are upcast to fp32 as HF's loss does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target):
        logits = F.linear(hidden, weight, bias)  # (N, V), model dtype
        # fp32 / fp64: the same tensor; fp16 / bf16: an fp32 copy, and the half logits go.
        p = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        del logits
        valid = target != -100  # (N,)
        t = torch.where(valid, target, 0)
        picked = p.gather(1, t.unsqueeze(1)).squeeze(1)  # (N,) the targets' logits
        top = p.amax(1)  # (N,) row maxima, for a stable exp
        p.sub_(top.unsqueeze(1)).exp_()  # p = exp(logits - max): the unnormalised softmax
        total = p.sum(1)  # (N,) >= 1 (the max's own term)
        rows = total.log().add_(top).sub_(picked)  # (N,) log-sum-exp - target logit
        loss = torch.where(valid, rows, 0.0).sum()
        ctx.save_for_backward(hidden, weight, p, total, t, valid)
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, weight, p, total, t, valid = ctx.saved_tensors
        # d loss / d logits = g * (softmax - onehot(t)) on valid rows, 0 elsewhere, where
        # softmax = p / total row-wise.
        g_row = torch.where(valid, grad / total, 0.0)  # (N,) fp32
        g_hot = torch.where(valid, grad, 0.0)  # (N,) fp32
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = grad_w = grad_b = None
        if weight.dtype not in (torch.float16, torch.bfloat16):
            # fp32: scale the (N, H) and (V, H) products instead of the (N, V) probabilities.
            # (On CUDA `index_add_` adds with atomics: the weight gradient is not bitwise
            # reproducible there, as embedding gradients are not.)
            if need_h:
                grad_h = (p @ weight).mul_(g_row.unsqueeze(1))
                grad_h.sub_(weight.index_select(0, t).mul_(g_hot.unsqueeze(1)))
            if need_w:
                grad_w = p.t() @ (hidden * g_row.unsqueeze(1))
                grad_w.index_add_(0, t, hidden * -g_hot.unsqueeze(1))
            if need_b:
                grad_b = p.t() @ g_row
                grad_b.index_add_(0, t, -g_hot)
        else:
            # Half precision: the gradient must be scaled before it is rounded (fp16's loss
            # scale lives in `grad`). p is overwritten, so this backward runs once (a second
            # one, with retain_graph, raises autograd's in-place error).
            p.mul_(g_row.unsqueeze(1))
            p[torch.arange(p.shape[0], device=p.device), t] -= g_hot
            grad_logits = p.to(weight.dtype)
            if need_h:
                grad_h = grad_logits @ weight
            if need_w:
                grad_w = grad_logits.t() @ hidden
            if need_b:
                grad_b = grad_logits.sum(0)
        return grad_h, grad_w, grad_b if ctx.has_bias else None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    """Summed token cross-entropy of the LM head `hidden @ weight.T + bias` against `target`
    (-100 ignored), without keeping the logits; see `LinearCrossEntropy`."""
    return LinearCrossEntropy.apply(hidden, weight, bias, target)


class HeadLoss:
    """`loss(head(hidden), labels)`, with the head's matrix product fused into the
    cross-entropy when the LM head is a plain `nn.Linear` (not adapted by LoRA), on the rows
    that carry a target when `select_rows`, and recomputed in the backward when `recompute`.
    `normalizer` and `scale` are those of the wrapped `TokenMeanLoss` (the engine sets them
    before each step)."""

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
        target = shifted_targets(labels)  # (B*S,)
        rows = hidden.reshape(-1, hidden.shape[-1])  # (B*S, H)
        if self.select_rows:  # the final norm is per token: select first, then normalise
            keep = (target != -100).nonzero().squeeze(1)  # (M,) rows that carry loss
            rows, target = rows.index_select(0, keep), target.index_select(0, keep)
        rows = self.head.normalize(rows)
        lm_head = self.head.lm_head
        if type(lm_head) is not nn.Linear:  # e.g. a LoRA-adapted head: no fusion
            return self.loss.on_rows(lm_head(rows), target)
        loss = linear_cross_entropy(rows, lm_head.weight, lm_head.bias, target)
        return loss * (self.loss.scale / self.loss.normalizer)

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
