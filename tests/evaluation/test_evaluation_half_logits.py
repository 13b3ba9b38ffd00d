"""Perplexity from a half-precision model (gpu-paths review item 15): the continuation's
log-softmax runs in fp32, so bf16 logits give the log-probabilities of their fp32 upcast, not a
bf16 log-softmax's rounded ones."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from openchatkit.evaluation.perplexity import score_windows


class _Bf16Logits(torch.nn.Module):
    """Returns fixed bf16 logits (batch, width, vocab) whatever the ids, as a bf16 GPU model's
    forward does."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        g = torch.Generator().manual_seed(int(ids.shape[1]))
        logits = 8 * torch.randn(ids.shape[0], ids.shape[1], self.vocab, generator=g)
        return SimpleNamespace(logits=logits.to(torch.bfloat16))


def test_bf16_logits_are_scored_in_fp32():
    vocab = 5000
    model = _Bf16Logits(vocab)
    windows = [([1, 2, 3], [4, 5, 6, 7]), ([9], [10, 11])]
    got = score_windows(model, windows, batch_size=2, device="cpu")
    # Both windows share the first batch, whose width is the longer input (6 tokens).
    logits = model(torch.zeros(2, 6, dtype=torch.long)).logits
    worst_fp32 = worst_bf16 = 0.0
    for row, (ctx, cont) in enumerate(windows):
        end = len(ctx) + len(cont) - 1
        rows = logits[row, end - len(cont) : end]
        target = torch.tensor(cont)[:, None]
        exact = torch.log_softmax(rows.double(), -1).gather(-1, target)[:, 0]
        half = torch.log_softmax(rows, -1).gather(-1, target)[:, 0].double()
        worst_fp32 = max(worst_fp32, (got[row] - exact).abs().max().item())
        worst_bf16 = max(worst_bf16, (half - exact).abs().max().item())
    assert worst_fp32 < 1e-4, worst_fp32
    assert worst_bf16 > 100 * worst_fp32, (worst_bf16, worst_fp32)  # what bf16 would give
