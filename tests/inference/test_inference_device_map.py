"""The bot's GPU placement decisions, checked on CPU (issue 11, item 7): `-r N` without `-g`
keeps the chosen GPU in accelerate's max_memory, and "auto" precision follows the chosen GPU's
own compute capability (bf16 from Ampere on, fp16 before)."""

from __future__ import annotations

import torch

from openchatkit.models import loading

GIB = 1024**3


def test_cpu_offload_alone_keeps_the_chosen_gpu():
    got = loading.offload_max_memory({}, 20.0, 1, 80 * GIB)
    assert got == {1: int(0.9 * 80 * GIB), "cpu": "20.0GiB"}
    given = loading.offload_max_memory({0: "10GiB", 1: "12GiB"}, None, 1, 80 * GIB)
    assert given == {0: "10GiB", 1: "12GiB"}


def test_auto_dtype_follows_the_chosen_gpu(monkeypatch):
    capabilities = {0: (9, 0), 1: (7, 5)}  # an H100 and a T4 in one machine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])
    assert loading.pick_dtype("auto", "cuda:0") is torch.bfloat16
    assert loading.pick_dtype("auto", "cuda:1") is torch.float16
    assert loading.cuda_half_dtype((8, 0)) is torch.bfloat16
    assert loading.pick_dtype("float32", "cuda:1") is torch.float32
