"""Hostile or damaged trainer checkpoints (security review findings 1, 7, 9, 13, 14).

A checkpoint folder is input the user may not have made: a planted pickle must not run,
`latest` must not lead outside the folder, a meta.json without its file list must not switch
verification off, retention must never delete the checkpoint just published nor keep a damaged
one over a good one, and every file is fsynced before an older checkpoint is deleted.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from openchatkit.errors import UserError
from openchatkit.training import checkpoint as ckpt


def _fake_checkpoint(root: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    """A complete checkpoint folder as the trainer writes it (sizes and hashes in meta.json)."""
    tmp = ckpt.prepare_temp(root, step)
    for rel, data in {"manifest.json": b"{}", "layer_00000.safetensors": b"w" * 64,
                      **(files or {})}.items():  # fmt: skip
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return ckpt.publish(root, step, {"step": step}, keep=0)


class _Planted:
    """Pickles to a call of `open(marker, "w")`: creates the marker file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_rng_file_does_not_run(tmp_path):
    folder = tmp_path / "checkpoint_2"
    (folder / "rng").mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"torch": _Planted(str(marker))}, folder / "rng" / "rank_00000.pt")
    state = ckpt.load_rank_rng(folder, 0)  # refused: the caller reseeds, with a warning
    assert not marker.exists(), "the planted pickle ran"
    assert state is None
    # A bare pickle (no torch zip container) is refused as well.
    with open(folder / "rng" / "rank_00000.pt", "wb") as f:
        pickle.dump({"torch": _Planted(str(marker))}, f)
    assert ckpt.load_rank_rng(folder, 0) is None
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only(tmp_path):
    ckpt.seed_everything(1234)
    random.gauss(0, 1)  # a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    ckpt.write_rank_state(tmp_path, 3)
    expected = (torch.rand(4), np.random.rand(4), [random.random(), random.gauss(0, 1)])
    ckpt.seed_everything(99)
    state = ckpt.load_rank_rng(tmp_path, 3)
    assert state is not None
    # Nothing but tensors and plain values: torch's strict unpickler reads it.
    torch.load(tmp_path / "rng" / "rank_00003.pt", weights_only=True)
    ckpt.set_rng_state(state)
    got = (torch.rand(4), np.random.rand(4), [random.random(), random.gauss(0, 1)])
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


@pytest.mark.parametrize("named", ["ABSOLUTE", "../elsewhere", "checkpoint_2/../../elsewhere"])
def test_latest_cannot_lead_outside_the_folder(tmp_path, named):
    root = tmp_path / "run"
    good = _fake_checkpoint(root, 2)
    elsewhere = _fake_checkpoint(tmp_path / "other", 9).rename(tmp_path / "elsewhere")
    (root / "latest").write_text(str(elsewhere) if named == "ABSOLUTE" else named)
    assert ckpt.find_latest(root) == good


def test_a_meta_json_without_its_file_list_is_refused(tmp_path):
    root = tmp_path / "run"
    folder = _fake_checkpoint(root, 2)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["files"]
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "layer_00000.safetensors").write_bytes(b"x")  # would go unnoticed without a list
    assert "lists no files" in (ckpt.verify_checkpoint(folder) or "")
    with pytest.raises(UserError, match="no intact checkpoint"):
        ckpt.find_latest(root)


def test_listed_names_may_not_leave_the_folder(tmp_path):
    folder = _fake_checkpoint(tmp_path / "run", 2)
    meta = json.loads((folder / "meta.json").read_text())
    (tmp_path / "outside.txt").write_text("12345")
    meta["files"]["../../outside.txt"] = {"size": 5}  # exists with that size: only the name is bad
    (folder / "meta.json").write_text(json.dumps(meta))
    assert ckpt.verify_checkpoint(folder) is not None


def test_the_newest_complete_checkpoint_wins_over_a_stale_latest(tmp_path):
    """`latest` could not be rewritten after checkpoint_4 was renamed in (a full disk, a crash):
    the resume takes checkpoint_4, not the older one `latest` names."""
    root = tmp_path / "run"
    _fake_checkpoint(root, 2)
    four = _fake_checkpoint(root, 4)
    (root / "latest").write_text("checkpoint_2\n")
    assert ckpt.find_latest(root) == four


@pytest.mark.parametrize("keep", [1, 2])
def test_retention_keeps_the_new_checkpoint_and_prefers_intact_ones(tmp_path, keep):
    """Review finding 9: checkpoint_2 intact, checkpoint_4 damaged, a save at step 3."""
    root = tmp_path / "run"
    two = _fake_checkpoint(root, 2)
    four = _fake_checkpoint(root, 4)
    with open(four / "layer_00000.safetensors", "r+b") as f:
        f.truncate(10)
    assert ckpt.find_latest(root) == two
    tmp = ckpt.prepare_temp(root, 3)
    (tmp / "manifest.json").write_text("{}")
    (tmp / "layer_00000.safetensors").write_bytes(b"v" * 64)
    three = ckpt.publish(root, 3, {"step": 3}, keep=keep)
    assert three.is_dir() and (root / "latest").read_text().strip() == "checkpoint_3"
    assert ckpt.find_latest(root) == three
    kept = [p.name for _, p in ckpt.list_checkpoints(root)]
    assert "checkpoint_4" not in kept  # the damaged one never pushes out an intact one
    assert kept == (["checkpoint_3"] if keep == 1 else ["checkpoint_2", "checkpoint_3"])


def test_everything_is_fsynced_before_an_older_checkpoint_is_deleted(tmp_path, monkeypatch):
    """Review finding 7: with --num-checkpoints 1 a power cut after the save must leave the new
    checkpoint on disk, so its files, its folders and `latest` are synced before retention."""
    root = tmp_path / "run"
    old = _fake_checkpoint(root, 2)
    events: list[tuple[str, str]] = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    tmp = ckpt.prepare_temp(root, 4)
    (tmp / "manifest.json").write_text("{}")
    (tmp / "optimizer").mkdir()
    with open(tmp / "optimizer" / "stage_000.pt", "wb") as f:
        f.write(b"o" * 32)  # written without a sync: the hashing rank syncs it
    ckpt.write_rank_state(tmp, 0)
    ckpt.hash_share(tmp, 0, 1)
    new = ckpt.publish(root, 4, {"step": 4}, keep=1)
    deleted = [i for i, (kind, path) in enumerate(events) if kind == "rmtree" and path == str(old)]
    assert deleted, events
    synced = {path for kind, path in events[: deleted[0]] if kind == "fsync"}
    # Paths as they were when synced: files and folders under the temp name, then the root.
    for rel in ("manifest.json", "optimizer/stage_000.pt", "rng/rank_00000.pt"):
        assert str(tmp / rel) in synced or str(new / rel) in synced, (rel, synced)
    for folder in (tmp, tmp / "optimizer", tmp / "rng"):
        assert str(folder) in synced, (folder, synced)
    assert str(root) in synced
    # meta.json and `latest` are written under a temporary name, synced, then renamed.
    assert any(p.startswith(str(tmp / ".meta.json.tmp-")) for p in synced), synced
    assert any(p.startswith(str(root / ".latest.tmp-")) for p in synced), synced


def test_the_layout_module_is_torch_free_and_models_do_not_import_training():
    import subprocess
    import sys

    code = (
        "import sys, openchatkit.checkpoints as c\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n"
        "import openchatkit.models.convert, openchatkit.models.any_model\n"
        "assert not [m for m in sys.modules if m.startswith('openchatkit.training')], 'training'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
