"""The data-parallel gradient reduction: the trainer's GradBuckets (openchatkit/training/
grad_buckets.py) against torch's DistributedDataParallel (what composable `replicate` wraps) on
CPU gloo, dp=2, with gradient accumulation over micro-batches (DDP: `no_sync` for all but the
last), alternating the two sides run by run; prints the median and spread of the step times and
checks that both give the same summed gradients.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_grad_reduction.py
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_grad_reduction.py \
        --runs 5 --steps 10 --micro-batches 8 --width 1024 --layers 8

fp32 only: on CPU both keep the gradients as views of their fp32 buckets. The half-precision
difference (GradBuckets sums fp16/bf16 micro-batch gradients into fp32 buckets; DDP sums them in
the parameters' dtype) is a matter of numerics, not speed: see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BUCKET_MB = 25  # DDP's default bucket_cap_mb; GradBuckets gets the same number of elements


def build(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks)


def run_side(side: str, args, rank: int) -> tuple[float, torch.Tensor]:
    """Seconds for args.steps steps of one side, and its last summed gradient (flat)."""
    from openchatkit.training.grad_buckets import GradBuckets

    model = build(args.width, args.layers)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1 + rank)
    xs = [torch.randn(args.rows, args.width, generator=g) for _ in range(args.micro_batches)]
    if side == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, bucket_cap_mb=BUCKET_MB, gradient_as_bucket_view=True)
    else:
        buckets = GradBuckets(params, None, BUCKET_MB * 2**20 // 4, persistent=True)
        buckets.group = dist.group.WORLD  # dp=2 over the default group
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(args.steps):
        if side == "ddp":
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()  # in place: the grads are DDP's bucket views
            for i, x in enumerate(xs):
                with wrapped.no_sync() if i < len(xs) - 1 else contextlib.nullcontext():
                    wrapped(x).square().mean().backward()
        else:
            buckets.begin(len(xs))
            for x in xs:
                model(x).square().mean().backward()
            buckets.finish()
            if step < args.steps - 1:
                buckets.end_step()
    seconds = time.perf_counter() - t0
    # No optimizer: every step sums the same gradients. DDP averages over the ranks,
    # GradBuckets sums (the engine divides the loss by the global token count instead).
    if side == "ddp":
        grads, scale = [p.grad for p in params], 1.0
    else:
        grads, scale = [buckets.grad(p) for p in params], 1.0 / dist.get_world_size()
    flat = torch.cat([gr.reshape(-1) for gr in grads]) * scale
    return seconds, flat.clone()


def worker(rank: int, args, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    times: dict[str, list[float]] = {"buckets": [], "ddp": []}
    last: dict[str, torch.Tensor] = {}
    for r in range(args.runs):
        order = ("buckets", "ddp") if r % 2 == 0 else ("ddp", "buckets")
        for side in order:
            seconds, flat = run_side(side, args, rank)
            times[side].append(seconds)
            last[side] = flat
    if rank == 0:
        # DDP's last micro-batch also runs on the same data; the sums must agree.
        err = (last["buckets"] - last["ddp"]).abs().max().item()
        out.put((times, err))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(worker, args=(args, port, out), nprocs=2, start_method="spawn")
    times, err = out.get()
    for side, ts in times.items():
        per = [t / args.steps * 1e3 for t in ts]
        print(
            f"{side:8s} median {statistics.median(per):8.2f} ms/step  "
            f"spread {min(per):.2f}-{max(per):.2f}  ({args.runs} runs)"
        )
    ratio = statistics.median(times["ddp"]) / statistics.median(times["buckets"])
    print(f"DDP / GradBuckets step time: {ratio:.3f}; max |grad difference| {err:.2e}")
    return 0 if err < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
