"""Gradient buckets: assignment, in-place sums over gloo, and all-reduces that start during the
backward (openchatkit/training/grad_buckets.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from openchatkit.training.grad_buckets import GradBuckets, assign_buckets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_buckets_follow_reverse_order_split_by_dtype_and_size():
    ps = [
        nn.Parameter(torch.zeros(10)),
        nn.Parameter(torch.zeros(30)),
        nn.Parameter(torch.zeros(5, dtype=torch.bfloat16)),
        nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)),
        nn.Parameter(torch.zeros(50)),
    ]
    buckets = assign_buckets(ps, bucket_numel=40)
    index = {id(p): i for i, p in enumerate(ps)}
    got = [[index[id(p)] for p in b.params] for b in buckets]
    # Reverse order; a new bucket at a dtype change or past 40 elements; 50 > 40 stands alone.
    assert got == [[4], [3, 2], [1, 0]]
    assert [b.numel for b in buckets] == [50, 9, 40]
    assert buckets[2].offsets == [0, 30]
    with pytest.raises(ValueError):
        assign_buckets(ps, 0)


class _Net(nn.Module):
    """Four linears, and a parameter the forward never uses, registered first so that it gets
    the last bucket (buckets follow the reverse order): it is summed at `finish`."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.unused = nn.Parameter(torch.ones(3))
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    model = _Net(0)
    params = list(model.parameters())
    # 72 elements per linear (64 + 8): buckets [linear 3], [2], [1], [0], [unused].
    grads = GradBuckets(params, torch.distributed.group.WORLD, 72, persistent=True)
    events: list[str] = []
    launch = grads._launch
    grads._launch = lambda j: (events.append(f"launch {j}"), launch(j))
    # When the backward reaches the first linear (the last one to get its gradients).
    model.layers[0].register_full_backward_pre_hook(lambda *a: events.append("reach 0"))
    results = []
    for step in range(2):
        grads.begin(expected=2)  # two micro-batches
        torch.manual_seed(100 + 10 * step + rank)
        for _ in range(2):
            model(torch.randn(4, 8)).pow(2).sum().backward()
        early = grads.started_early
        grads.finish()
        results.append(
            {"grads": [p.grad.clone() for p in params], "early": early, "events": events[:]}
        )
        events.clear()
        grads.end_step()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_sums_equal_the_manual_sum_and_start_during_the_backward(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for step in range(2):
        # The reference: each rank's own gradients of the same inputs, summed by hand.
        expected = None
        for rank in range(2):
            model = _Net(0)
            torch.manual_seed(100 + 10 * step + rank)
            for _ in range(2):
                model(torch.randn(4, 8)).pow(2).sum().backward()
            g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
            expected = g if expected is None else [a + b for a, b in zip(expected, g, strict=True)]
        for got in ranks:
            for a, b in zip(got[step]["grads"], expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            # Linears 3, 2, 1, 0 are summed from hooks during the last backward, linear 3's
            # before that backward reaches linear 0; the unused parameter's bucket at finish.
            events = got[step]["events"]
            assert got[step]["early"] == 4, got[step]
            assert [e for e in events if e.startswith("launch")] == [
                f"launch {i}" for i in range(5)
            ]
            last_reach = len(events) - 1 - events[::-1].index("reach 0")
            assert events.index("launch 0") < last_reach, events
            assert events.index("launch 4") > last_reach, events
