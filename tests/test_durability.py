"""Durability and ownership of what the kit writes (security review findings 14, 15, 16, 18 and
gpu-paths defect 10): a full disk gives the one-line error and `latest` keeps naming a complete
checkpoint; a dead writer's temp file is removed by the next write; the run lock is released on
SIGTERM and on the watchdog's exit and is not taken over from a container that shares the host
name; `--overwrite` replaces only folders that look like the kit's own output; a resume hashes
each rank's share of the checkpoint before any process group exists."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from openchatkit import fileio
from openchatkit.errors import UserError
from openchatkit.fileio import OutputError, atomic_dir, atomic_file, check_output_folder, write_json

REPO = Path(__file__).resolve().parents[1]


def _fill(folder: Path) -> None:
    """Fill the file system of `folder` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                continue


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def test_write_json_on_a_full_disk_is_one_line_error_and_keeps_the_old_file(small_disk):
    dest = small_disk / "results.json"
    write_json(dest, {"old": True})
    _fill(small_disk)
    with pytest.raises(OutputError) as err:
        write_json(dest, {"new": "x" * 100_000})
    assert str(dest) in str(err.value) and "No space left" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert json.loads(dest.read_text()) == {"old": True}
    assert [p.name for p in small_disk.iterdir() if ".tmp-" in p.name] == []


def test_a_full_disk_while_publishing_keeps_latest_on_a_complete_checkpoint(small_disk):
    from openchatkit.training import checkpoint as ckpt

    root = small_disk / "run"
    for step in (2, 4):
        tmp = ckpt.prepare_temp(root, step)
        (tmp / "manifest.json").write_text("{}")
        (tmp / "layer_00000.safetensors").write_bytes(b"w" * 1000)
        if step == 2:
            ckpt.publish(root, step, {"step": step}, keep=1)
    _fill(small_disk)
    with pytest.raises(OutputError, match="No space left"):
        # meta.json cannot be written: the new checkpoint is never renamed into place.
        ckpt.publish(root, 4, {"step": 4, "padding": "p" * 100_000}, keep=1)
    assert (root / "latest").read_text().strip() == "checkpoint_2"
    assert ckpt.find_latest(root) == root / "checkpoint_2"


def test_atomic_file_removes_a_dead_writers_temp_file(tmp_path):
    dest = tmp_path / "big.jsonl"
    mine = fileio.temp_prefix(dest)
    stale = tmp_path / (mine.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-") + "k3j2")
    stale.write_text("half a file")
    live = tmp_path / (mine + "live")  # this process's own: kept
    live.write_text("being written")
    with atomic_file(dest) as f:
        f.write("whole\n")
    assert not stale.exists()
    assert live.exists()
    assert dest.read_text() == "whole\n"


# -- the run lock ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from openchatkit.training.lock import CheckpointLock, release_on_sigterm
lock = CheckpointLock.acquire(sys.argv[1])
release_on_sigterm()  # as training/dist_clm_train.py does on rank 0
print("ready", flush=True)
time.sleep(60)
"""


def test_the_run_lock_is_released_on_sigterm(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert (root / ".lock").exists()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (root / ".lock").exists()


def test_the_watchdogs_exit_releases_the_run_lock_first(tmp_path):
    from openchatkit.training.lock import CheckpointLock, releasing

    lock = CheckpointLock.acquire(tmp_path)
    seen = []

    def on_dead(message):  # stands for the watchdog's os._exit, which skips every `finally`
        seen.append((message, (tmp_path / ".lock").exists()))

    releasing(on_dead)("rank 1 died")
    assert seen == [("rank 1 died", False)]
    lock.release()


def test_a_lock_from_a_container_sharing_the_host_name_is_not_taken_over(tmp_path):
    from openchatkit.training.lock import CheckpointLock

    record = {
        "host": socket.gethostname(),  # the same name, but another pid namespace / machine
        "host_id": socket.gethostname() + "~0badb007~4026531836",
        "pid": _dead_pid(),  # not running *here*, which says nothing about the other container
        "start_time": time.time() - 5,
        "started": "then",
    }
    (tmp_path / ".lock").write_text(json.dumps(record))
    with pytest.raises(UserError, match="in use by another run.*delete"):
        CheckpointLock.acquire(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text()) == record


# -- --overwrite ---------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_an_earlier_output(tmp_path):
    mine = tmp_path / "models"
    (mine / "project").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="notes.txt, project/.*--overwrite replaces only"):
        check_output_folder(mine, overwrite=True)
    with pytest.raises(OutputError, match="notes.txt"), atomic_dir(mine, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "project").is_dir()
    # An earlier output (a converted model folder) is replaced as before.
    out = tmp_path / "converted"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "merges.txt"):
        (out / name).write_text("old")
    check_output_folder(out, overwrite=True)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


# -- resume: each rank hashes its share before the process group (gpu-paths defect 10) -----------


def test_resume_hashes_this_ranks_share_before_the_process_group(tmp_path, monkeypatch):
    import openchatkit.checkpoints as checkpoints
    from openchatkit.training import checkpoint as ckpt
    from openchatkit.training import trainer

    root = tmp_path / "run"
    tmp = ckpt.prepare_temp(root, 2)
    (tmp / "manifest.json").write_text("{}")
    for i in range(6):
        (tmp / f"layer_{i:05d}.safetensors").write_bytes(bytes([i]) * 100)
    ckpt.publish(root, 2, {"step": 2}, keep=0)
    files = sorted(json.loads((root / "checkpoint_2" / "meta.json").read_text())["files"])
    events: list[str] = []
    real = checkpoints.file_sha256
    monkeypatch.setattr(checkpoints, "file_sha256", lambda p: events.append(p.name) or real(p))
    monkeypatch.setattr(trainer.Run, "init_distributed", lambda self: events.append("<pg>"))
    monkeypatch.setattr(trainer.Run, "build", lambda self: events.append("<build>"))
    monkeypatch.setattr(trainer.Run, "train", lambda self: 0)
    config = types.SimpleNamespace(checkpoint_path=str(root), pp=1, dp=3)
    rdv = types.SimpleNamespace(rank=1, world_size=3)
    assert trainer.run_training(config, rdv) == 0
    share = [Path(f).name for f in files[1::3]]
    assert events == [*share, "<pg>", "<build>"], events


def test_ranks_agree_to_skip_a_checkpoint_another_rank_found_damaged(tmp_path):
    """Rank 0's share of checkpoint_4 is intact; the other rank's is not (same size, other
    bytes): both fall back to checkpoint_2, and rank 0 sets checkpoint_4 aside."""
    from openchatkit.training import checkpoint as ckpt

    root = tmp_path / "run"
    for step in (2, 4):
        tmp = ckpt.prepare_temp(root, step)
        (tmp / "manifest.json").write_text("{}")
        for i in range(2):
            (tmp / f"layer_{i:05d}.safetensors").write_bytes(b"w" * 100)
        ckpt.publish(root, step, {"step": step}, keep=0)
    files = sorted(json.loads((root / "checkpoint_4" / "meta.json").read_text())["files"])
    (root / "checkpoint_4" / files[1]).write_bytes(b"x" * 100)  # in rank 1's share of 2
    checks = [ckpt.ResumeCheck(root, rank, 2) for rank in (0, 1)]
    for check in checks:
        check.precheck()
    assert checks[0].share_problem is None and "sha256" in checks[1].share_problem
    # What the all-reduce tells each rank: round 1 (checkpoint_4) someone found damage, round 2
    # (checkpoint_2) nobody did. Rank 1 first, so rank 0's set-aside comes last, as in a run.

    def verdicts():
        answers = iter([True, False])
        return lambda flag: next(answers)

    assert checks[1].agree(verdicts()) == root / "checkpoint_2"
    assert checks[0].agree(verdicts()) == root / "checkpoint_2"
    assert not (root / "checkpoint_4").exists() and (root / ".checkpoint_4.damaged").is_dir()
    assert ckpt.find_latest(root) == root / "checkpoint_2"
