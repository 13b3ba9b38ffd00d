"""One run per checkpoint folder, ranks that die with their launcher, verified checkpoints with
a fallback, and the peer watchdog's stated bound."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openchatkit.errors import UserError
from openchatkit.training import checkpoint as ckpt
from openchatkit.training.lock import LOCK_FILE, CheckpointLock


def _holder(path: Path) -> dict:
    return json.loads((path / LOCK_FILE).read_text())


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    root = tmp_path / "run"
    lock = CheckpointLock.acquire(root)
    held = _holder(root)
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(UserError, match=rf"in use by another run \(host .*, pid {os.getpid()}"):
        CheckpointLock.acquire(root)
    lock.release()
    assert not root.exists()  # created by this run and left empty: removed


def test_a_stale_lock_is_taken_over_and_another_hosts_is_not(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    record = {"host": socket.gethostname(), "pid": int(gone), "start_time": time.time() - 5}
    (root / LOCK_FILE).write_text(json.dumps(record))
    lock = CheckpointLock.acquire(root)  # the holder is gone: taken over (with a warning)
    assert _holder(root)["pid"] == os.getpid()
    lock.release()
    assert root.is_dir()  # it existed before this run
    (root / LOCK_FILE).write_text(json.dumps({**record, "host": "elsewhere", "pid": 1}))
    with pytest.raises(UserError, match="host elsewhere.*delete"):
        CheckpointLock.acquire(root)


def _fake_checkpoint(root: Path, step: int, files: dict[str, bytes]) -> Path:
    folder = root / f"checkpoint_{step}"
    folder.mkdir(parents=True)
    for rel, data in {"manifest.json": b"{}", **files}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    listed = {
        rel: {"size": (folder / rel).stat().st_size, "sha256": ckpt.file_sha256(folder / rel)}
        for rel in ckpt.checkpoint_files(folder)
    }
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "files": listed}))
    (root / "latest").write_text(folder.name)
    return folder


def test_find_latest_skips_damaged_checkpoints_newest_first(tmp_path):
    files = {"layer_00000.safetensors": b"a" * 100, "optimizer/stage_000.pt": b"b" * 50}
    two = _fake_checkpoint(tmp_path, 2, files)
    four = _fake_checkpoint(tmp_path, 4, files)
    six = _fake_checkpoint(tmp_path, 6, files)
    assert ckpt.find_latest(tmp_path) == six
    (six / "optimizer" / "stage_000.pt").write_bytes(b"b" * 10)  # truncated
    (four / "layer_00000.safetensors").write_bytes(b"c" * 100)  # same size, other bytes
    assert ckpt.verify_checkpoint(six) == "optimizer/stage_000.pt has 10 bytes, 50 expected"
    assert "sha256" in ckpt.verify_checkpoint(four)
    assert ckpt.verify_checkpoint(four, hashes=False) is None
    assert ckpt.find_latest(tmp_path) == two
    (two / "manifest.json").unlink()
    with pytest.raises(UserError, match="no intact checkpoint"):
        ckpt.find_latest(tmp_path)


def test_a_truncated_latest_checkpoint_falls_back_and_ends_bit_identical(
    tiny, tt, tmp_path, train_here
):
    """Checkpoints at steps 2 and 4; step 4's optimizer file is truncated; the rerun warns once,
    resumes from step 2, and its step-4 weights equal the uninterrupted run's. The first run
    calls the trainer's main in this process (`train_here`); the rerun is a real process."""
    run = tmp_path / "run"
    r = train_here(tt.train_args(tiny, "llama", run))
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((run / "checkpoint_4" / "meta.json").read_text())
    assert meta["files"]["optimizer/stage_000.pt"]["size"] > 0
    shutil.copytree(run / "checkpoint_4", tmp_path / "uninterrupted")
    with open(run / "checkpoint_4" / "optimizer" / "stage_000.pt", "r+b") as f:
        f.truncate(100)
    r = tt.run_train(tt.train_args(tiny, "llama", run))
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stderr.splitlines() if "skipping damaged" in ln]
    assert len(warnings) == 1 and "checkpoint_4: optimizer/stage_000.pt" in warnings[0]
    assert tt.max_weight_diff(run / "checkpoint_4", tmp_path / "uninterrupted") == 0.0
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "resume", "step": 2} == {k: records[4][k] for k in ("kind", "step")}
    assert not (run / LOCK_FILE).exists()


SLEEPER = (
    "import os, sys, time\nopen(sys.argv[1] + f'/{os.getpid()}', 'w').close()\ntime.sleep(600)\n"
)


def test_ranks_die_with_a_sigkilled_launcher(tt, tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    pids = tmp_path / "pids"
    pids.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, str(tt.LAUNCH), "--nproc", "2", "--device", "cpu", "--", str(script)]
        + [str(pids)],
        cwd=tt.REPO,
        env=tt.clean_env(),
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    ranks = [int(p.name) for p in pids.iterdir()]
    assert len(ranks) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    alive = ranks
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in ranks if _running(pid)]
        time.sleep(0.1)
    for pid in alive:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert alive == [], "ranks outlived their launcher"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_watchdog_stops_every_rank_within_its_stated_bound():
    """A rank that never beats is dead from the start: every other rank is told within
    --peer-timeout plus one heartbeat period (`stop_bound_s`), plus scheduling slack."""
    import threading

    import torch.distributed as dist

    from openchatkit.distributed.watchdog import PeerWatchdog

    server = dist.TCPStore("127.0.0.1", 0, 4, is_master=True, wait_for_workers=False)
    events: dict[int, float] = {}
    lock = threading.Lock()
    t0 = time.monotonic()

    def record(rank):
        def on_dead(message):
            with lock:
                events.setdefault(rank, time.monotonic() - t0)

        return on_dead

    dogs = [PeerWatchdog("127.0.0.1", server.port, r, 4, 3.0, on_dead=record(r)) for r in range(4)]
    assert dogs[0].stop_bound_s == pytest.approx(3.25)  # 3 s + min(5, 3 / 12) s
    for d in dogs[:3]:
        d.start()
    while len(events) < 3 and time.monotonic() - t0 < 20:
        time.sleep(0.02)
    for d in dogs:
        d.stop(clean=False)
    assert sorted(events) == [0, 1, 2]
    slack = 1.5  # thread wake-ups on a loaded 2-core machine
    assert max(events.values()) <= dogs[0].stop_bound_s + slack, events
    assert min(events.values()) >= 3.0 - 2 * dogs[0].interval, events  # not before the timeout
