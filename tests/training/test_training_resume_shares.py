"""Resume in a 2-rank run (gpu-paths defect 10, security findings 1 and 9): each rank hashes
its own share of the checkpoint before the process group starts; a file damaged in rank 1's
share only (same size, other bytes) makes both ranks skip that checkpoint together, with one
warning, and rank 0 sets it aside; the RNG files are plain tensors."""

from __future__ import annotations

import json

import torch


def test_a_damage_only_one_rank_sees_is_skipped_by_both(tiny, tt, tmp_path):
    ckpt = tmp_path / "run"
    flags = dict(pipeline_group_size=2, checkpoint_steps=1, stop_after_steps=2)
    r = tt.run_train(tt.train_args(tiny, "llama", ckpt, **flags), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):  # the RNG state needs no pickle
        torch.load(ckpt / "checkpoint_2" / "rng" / f"rank_{rank:05d}.pt", weights_only=True)
    files = sorted(json.loads((ckpt / "checkpoint_2" / "meta.json").read_text())["files"])
    victim = ckpt / "checkpoint_2" / files[1::2][0]  # hashed by rank 1 only
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = tt.run_train(tt.train_args(tiny, "llama", ckpt, pipeline_group_size=2), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stderr.splitlines() if "skipping damaged" in ln]
    assert len(warnings) == 1 and "checkpoint_2" in warnings[0], r.stderr[-3000:]
    assert "resumed from" in r.stderr and "checkpoint_1" in r.stderr
    assert (ckpt / ".checkpoint_2.damaged").is_dir()
    assert (ckpt / "latest").read_text().strip() == "checkpoint_4"
