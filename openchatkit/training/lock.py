"""One training run per checkpoint folder: `<checkpoint-path>/.lock`.

Two runs on the same `--checkpoint-path` would interleave metrics.jsonl and race on
`checkpoint_<step>/` and `latest`. Rank 0 of a run creates the lock file exclusively
(O_CREAT | O_EXCL) before any process group exists and removes it when the run ends. It records
host, pid and start time, so a second run refuses in one line naming the holder.

A lock whose holder is gone is taken over with one warning: on the same host a pid that no
longer runs (or now runs a process started after the lock was written: the pid was reused) is
proof enough. "The same host" is the host id of `fileio.host_id` (host name, boot id and pid
namespace), so containers that share a host name never judge each other's pids. A holder on
another host cannot be checked from here; the message says which host and how to clear the
lock by hand.

The lock is released on every way out: a normal return or error (the caller's `finally`),
SIGTERM (`release_on_sigterm`: the launcher stops ranks that way) and the peer watchdog's
`os._exit` (`releasing`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from openchatkit.errors import UserError
from openchatkit.fileio import host_id

_HELD: list[CheckpointLock] = []  # locks this process holds, released on any way out

LOCK_FILE = ".lock"
# A lock file still empty or unparsable this long after it was created lost its writer.
PARTIAL_LOCK_GRACE_S = 10.0


def _proc_start_time(pid: int) -> float | None:
    """Seconds since the epoch at which `pid` started (Linux /proc), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_running(pid: int, since: float | None = None) -> bool:
    """True when `pid` runs on this host (and, with `since`, started no later than it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if since is not None:
        started = _proc_start_time(pid)
        if started is not None and started > since + 2.0:  # 2 s: clock-tick rounding
            return False  # the pid was reused by a newer process
    return True


@dataclass
class CheckpointLock:
    """The lock on one checkpoint folder, held by this process once `acquire` returned."""

    root: Path
    created_root: bool = False  # the folder did not exist before this run

    @property
    def path(self) -> Path:
        return self.root / LOCK_FILE

    @classmethod
    def acquire(cls, root: str | os.PathLike, flag: str = "--checkpoint-path") -> CheckpointLock:
        """Take the lock or raise a one-line UserError naming its holder."""
        root = Path(root)
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"{flag} {root}: cannot create it: {err.strerror or err}") from None
        lock = cls(root, created)
        for _ in range(3):  # a stale lock removed by a racing run: try again
            if lock._try_create():
                _HELD.append(lock)
                return lock
            holder = lock._read_holder()
            if holder is not None and not lock._stale(holder):
                raise UserError(lock._held_message(holder, flag))
            if holder is not None or lock._partial_and_old():
                logger.warning(
                    "{}: taking over the lock of a run that is gone ({})",
                    lock.path,
                    _describe(holder) if holder else "empty lock file",
                )
                with contextlib.suppress(FileNotFoundError):
                    lock.path.unlink()
            else:
                time.sleep(0.2)  # being written right now by another run
        raise UserError(f"{flag} {root}: could not take {lock.path}; another run is starting")

    def _try_create(self) -> bool:
        record = {
            "host": socket.gethostname(),
            "host_id": host_id(),
            "pid": os.getpid(),
            "start_time": time.time(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        except OSError as err:
            raise UserError(f"cannot create {self.path}: {err.strerror or err}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True

    def _read_holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and "pid" in holder else None

    def _partial_and_old(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > PARTIAL_LOCK_GRACE_S
        except FileNotFoundError:
            return True

    @staticmethod
    def _same_host(holder: dict) -> bool:
        if "host_id" in holder:  # host name + boot id + pid namespace
            return holder["host_id"] == host_id()
        return holder.get("host") == socket.gethostname()  # a lock of an older version

    @classmethod
    def _stale(cls, holder: dict) -> bool:
        if not cls._same_host(holder):
            return False  # cannot look at another host's (or container's) processes
        try:
            pid = int(holder["pid"])
        except (TypeError, ValueError):
            return True
        return not pid_running(pid, since=holder.get("start_time"))

    def _held_message(self, holder: dict, flag: str) -> str:
        other_host = not self._same_host(holder)
        hint = (
            f"if that run is gone, delete {self.path}"
            if other_host
            else "wait for it to finish, stop it, or use another checkpoint folder"
        )
        return f"{flag} {self.root} is in use by another run ({_describe(holder)}); {hint}"

    def release(self, remove_empty_root: bool = True) -> None:
        """Drop the lock (if still ours); a folder this run created and left empty goes too."""
        if self in _HELD:
            _HELD.remove(self)
        holder = self._read_holder()
        if holder is not None and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if remove_empty_root and self.created_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only succeeds when empty


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def release_held() -> None:
    """Release every lock this process holds (on the way out; safe to call twice)."""
    for lock in list(_HELD):
        with contextlib.suppress(OSError):
            lock.release(remove_empty_root=False)


def release_on_sigterm() -> None:
    """SIGTERM (the launcher's way to stop a rank) releases the held locks, then ends the
    process as SystemExit(143), so `finally` blocks run as well."""

    def handler(signum: int, frame) -> None:
        release_held()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def releasing(on_dead: Callable[[str], None]) -> Callable[[str], None]:
    """`on_dead` (the watchdog's, which ends the process with `os._exit`: no `finally` runs)
    preceded by releasing the held locks."""

    def wrapped(message: str) -> None:
        release_held()
        on_dead(message)

    return wrapped
