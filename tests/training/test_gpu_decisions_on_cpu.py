"""The GPU paths' decisions that CPU can check (issue 11, items 9-11): the MFU peak by exact
device name and N without the input embedding, which errors mean a lost peer, and the
launcher's environment (multi-node address, LOCAL_RANK, GPU count without nvidia-smi)."""

from __future__ import annotations

import pytest

from openchatkit.distributed import launcher
from openchatkit.distributed.env import cuda_device_index, resolve_rendezvous
from openchatkit.errors import UserError
from openchatkit.training.metrics import matmul_params, model_flops_per_token, peak_flops_of
from openchatkit.training.trainer import _PEER_LOST


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA H100 PCIe-NEW", None),  # unknown: no MFU rather than a wrong one
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_peak_flops_by_exact_device_name(name, peak):
    assert peak_flops_of(name) == peak


def test_mfu_counts_no_flops_for_an_untied_input_embedding():
    vocab, hidden, layers, seq = 50304, 2048, 24, 2048  # Pythia-1.4B
    total = 1_414_647_808
    untied = matmul_params(total, vocab, hidden, tied=False)
    assert untied == total - vocab * hidden
    assert matmul_params(total, vocab, hidden, tied=True) == total  # also the LM head
    overstated = model_flops_per_token(total, layers, hidden, seq) / model_flops_per_token(
        untied, layers, hidden, seq
    )
    assert 1.05 < overstated < 1.08  # what counting the lookup used to add


@pytest.mark.parametrize(
    "message,lost",
    [
        ("Connection reset by peer", True),
        ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer", True),
        ("NCCL error: remote process exited or there was a network error, ncclRemoteError", True),
        ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5) ran for 600000 ms", True),
        ("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO)", False),
        ("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage, NCCL version 2.21.5", False),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
        ("CUDA error: an illegal memory access was encountered", False),
    ],
)  # fmt: skip
def test_only_messages_about_another_rank_mean_a_lost_peer(message, lost):
    assert bool(_PEER_LOST.search(message)) is lost


def test_multi_node_needs_master_addr():
    with pytest.raises(UserError, match="NNODES=2 but MASTER_ADDR is not set"):
        launcher.plan_node(8, "cuda", env={"NNODES": "2", "NODE_RANK": "1"}, gpus=8)
    plan = launcher.plan_node(8, "cuda", env={"NNODES": "1"}, gpus=8)
    assert plan.master_addr == "127.0.0.1"


def test_gpu_count_falls_back_to_torch_without_nvidia_smi(monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert launcher.count_gpus() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launcher.count_gpus() == 0


def test_local_rank_is_never_guessed_from_the_global_rank_across_nodes():
    env = {"RANK": "9", "WORLD_SIZE": "16", "MASTER_ADDR": "n0", "MASTER_PORT": "7"}
    rdv = resolve_rendezvous(None, None, None, 8, 2, env=env)
    assert rdv.local_rank is None
    with pytest.raises(UserError, match="LOCAL_RANK is not set"):
        cuda_device_index(None, rdv.local_rank, rdv.rank, rdv.world_size, device_count=8)
    assert cuda_device_index(None, 1, 9, 16, device_count=8) == 1  # LOCAL_RANK
    assert cuda_device_index(5, None, 9, 16, device_count=8) == 5  # --cuda-id
    assert cuda_device_index(None, None, 3, 8, device_count=8) == 3  # one node: rank is local
    with pytest.raises(UserError, match="only 8 GPUs are visible"):
        cuda_device_index(9, None, 9, 16, device_count=8)
    single = resolve_rendezvous(None, None, None, 1, 1, env={})
    assert single.local_rank == 0


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="full", marks=pytest.mark.slow),  # ~7 s; the QLoRA case covers more
        pytest.param(
            ["--lora-r", "4", "--load-in-4bit", "--optimizer", "paged-8bit-adam"], id="qlora"
        ),
    ],
)
def test_gpu_step_check_runs_on_cpu(flags, tmp_path):
    """benchmarks/gpu_step_check.py, which gpu_check.sh runs on a lent GPU, on a tiny config on
    CPU: it trains (full, or QLoRA as the 3B recipe check runs it) and reports the planner's
    peak beside the step figures, so the script cannot rot between GPU sessions."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_step_check.py"), "--device", "cpu"]
    cmd += ["--config", "tiny", "--steps", "1", "--seq-length", "64", "--precision", "fp16"]
    cmd += [*flags, "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["step_s"] > 0 and figures["planned_peak_bytes"] > 0
    if flags:
        # Only the adapters train: r x (in + out) per layer's query_key_value, 2 layers.
        assert figures["lora_r"] == 4 and figures["load_in_4bit"]
        assert figures["trainable_params"] == 2 * 4 * (64 + 3 * 64) and figures["mfu"] is None
    else:
        assert figures["trainable_params"] > 100_000
