"""Half-precision runs sum their micro-batches' gradients in fp32 buckets (grad_buckets.py,
engine.py): 64 fp16 micro-batches give what an fp32 sum of the same gradients gives, where an
fp16 running sum (what `.grad` accumulation did before) drifts by orders of magnitude more."""

from __future__ import annotations

import torch
from torch import nn

from openchatkit.cli.train import config_with_defaults
from openchatkit.distributed.layout import ParallelLayout
from openchatkit.models.stage import StageModel
from openchatkit.training.config import read_model_shape
from openchatkit.training.engine import TokenMeanLoss, TrainEngine
from openchatkit.training.grad_buckets import GradBuckets
from openchatkit.training.loss import move_head_into_loss

MICRO = 64


def test_fp16_gradients_are_summed_in_fp32_buckets():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    grads = GradBuckets([p], None, 10_000, persistent=False, accum_dtype=torch.float32)
    assert grads.buckets[0].dtype == torch.float32
    parts = [torch.randn(4096).half() for _ in range(MICRO)]
    grads.begin(expected=MICRO)
    naive = torch.zeros(4096, dtype=torch.float16)
    for c in parts:
        (p * c).sum().backward()
        assert p.grad is None  # moved into the fp32 slice by the hook
        naive += c
    grads.finish()
    ours = grads.grad(p)
    assert ours.dtype == torch.float32
    exact = torch.stack([c.double() for c in parts]).sum(0)
    err_ours = (ours.double() - exact).abs().max().item()
    err_fp16 = (naive.double() - exact).abs().max().item()
    assert err_ours < 1e-5, err_ours  # fp32 rounding of sums of fp16 values near 8
    assert err_fp16 > 1e-3, err_fp16  # the half-precision running sum this replaces
    grads.end_step()
    assert grads.buckets[0].buffer is None and grads.grad(p) is None


def test_engine_fp16_master_gradients_equal_an_fp32_sum(tiny):
    """A tiny fp16 model, 64 micro-batches in one step: the fp32 masters' gradients (read at
    the optimizer step) equal the fp64 sum of the per-micro-batch fp16 gradients."""
    folder = tiny["gpt_neox"]
    shape = read_model_shape(folder)
    config = config_with_defaults(
        shape,
        batch_size=MICRO,
        micro_batch_size=1,
        fp16=True,
        initial_loss_scale=1024.0,
        max_grad_norm=0.0,
        lr=1e-3,
        total_steps=2,
    )
    layout = ParallelLayout(1, 1, 0)

    def build() -> StageModel:
        return StageModel.from_sharded(
            folder, config.layer_ranges[0], True, True, dtype=torch.float16
        )

    stage = build()
    engine = TrainEngine(stage, layout, config, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, shape.vocab_size, (MICRO, 12), generator=g)
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(12).expand(MICRO, 12).clone(),
    }
    captured: dict[str, torch.Tensor] = {}
    step = engine.optimizer.step

    def capture(*a, **k):
        for n, m in zip(engine.master.names, engine.master.params, strict=True):
            captured[n] = m.grad.double().clone()
        return step(*a, **k)

    engine.optimizer.step = capture
    result = engine.train_step([batch])
    assert not result.skipped

    # Reference: the same fp16 model, one backward per micro-batch with `.grad` reset, the
    # gradients summed in fp64 and unscaled as the engine does.
    ref = build()
    loss_fn = engine.loss_fn  # its normalizer and scale are the step's
    named = [(n, q) for n, q in ref.named_parameters() if q.requires_grad]
    ref_loss = move_head_into_loss(ref, TokenMeanLoss(), recompute=False, select_rows=False)
    ref_loss.normalizer, ref_loss.scale = loss_fn.normalizer, engine.scaler.scale
    total = {n: torch.zeros(q.shape, dtype=torch.float64) for n, q in named}
    naive = {n: torch.zeros(q.shape, dtype=torch.float16) for n, q in named}
    for i in range(MICRO):
        for _, q in named:
            q.grad = None
        sl = slice(i, i + 1)
        ref_loss(ref(batch["input_ids"][sl], position_ids=batch["position_ids"][sl]),
                 batch["labels"][sl]).backward()  # fmt: skip
        for n, q in named:
            if q.grad is not None:
                total[n] += q.grad.double()
                naive[n] += q.grad
    worst_ours = worst_fp16 = 0.0
    for n, _ in named:
        exact = total[n] / engine.scaler.scale
        scale = exact.abs().max().item() + 1e-12
        worst_ours = max(worst_ours, (captured[n] - exact).abs().max().item() / scale)
        fp16 = naive[n].double() / engine.scaler.scale
        worst_fp16 = max(worst_fp16, (fp16 - exact).abs().max().item() / scale)
    assert worst_ours < 1e-5, worst_ours
    assert worst_fp16 > 10 * worst_ours, (worst_fp16, worst_ours)
