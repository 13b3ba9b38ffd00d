"""Profiler traces tidied to the named categories (forward, backward, send, recv, all-reduce,
optimizer; GPU kernels), on CPU and GPU event shapes."""

from __future__ import annotations

import json

from openchatkit.training.profiling import categorize, tidy_trace


def test_trace_is_tidied_to_the_named_categories():
    raw = {
        "traceEvents": [
            {"ph": "X", "name": "Forward 0", "ts": 1, "dur": 5, "tid": 1},
            {"ph": "X", "name": "backward_chunk 0", "ts": 7, "dur": 5, "tid": 1},
            {"ph": "X", "name": "gloo:send", "ts": 2, "dur": 1},
            {"ph": "X", "name": "c10d::recv_", "ts": 3, "dur": 1},
            {"ph": "X", "name": "c10d::allreduce_", "ts": 13, "dur": 1},
            {"ph": "X", "name": "Optimizer.step#AdamW.step", "ts": 14, "dur": 1},
            {"ph": "X", "name": "aten::mm", "ts": 2, "dur": 1},
            {"ph": "i", "name": "Forward 1", "ts": 2},
        ]
    }
    out = tidy_trace(raw, rank=3)
    json.dumps(out)
    cats = [e["cat"] for e in out["traceEvents"] if e["ph"] == "X"]
    assert cats == ["forward", "send", "recv", "backward", "all-reduce", "optimizer"]
    assert categorize("aten::mm") is None
    # On a GPU: device kernels are kept (NCCL's by their collective), CPU-side aten ops are not.
    gpu = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_f32", "ts": 1},
            {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16", "ts": 2},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 3},
        ]
    }
    cats = [e["cat"] for e in tidy_trace(gpu, rank=0)["traceEvents"] if e["ph"] == "X"]
    assert cats == ["all-reduce", "gpu"]
