"""Atomic file and folder writes: write under a temporary name, then rename.

A reader (or a killed process) never sees a half-written file under its final name. What is
written gets the permissions the umask allows (as `open()` and `mkdir` would give), not the
0600/0700 of Python's `tempfile`, so other users and nodes running as another user on a shared
file system can read it. Temporary names carry the host and pid of their writer, so the next
write to the same destination removes what a killed writer left behind (`atomic_file` and
`atomic_dir` alike). The host is recorded with its boot id and pid namespace (`host_id`), so
containers that share a host name never take each other's live pids for dead ones.

Durability: a file is fsynced before its rename and the folder after it, so a power cut leaves
the old or the new content, never an empty file under the final name.

Failures to write (a read-only or missing parent, a name that is a file, a full disk) become
one-line `OutputError`s naming the destination. `--overwrite` replaces only a folder that looks
like the kit's own output (`foreign_entries`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openchatkit.errors import UserError

# errno values of a write refused for want of room: a full disk, a quota, a file too large.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutputError(UserError):
    """An output path that cannot be written: the message names it and the reason."""


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, recursive: bool = False) -> None:
    """Give `path` (a temp file 0600 or folder 0700) the mode `open()`/`mkdir` would have given.

    With `recursive`, files and folders below it that are private to the owner (no group or
    other bits, as `tempfile` makes them) get the same treatment; others keep their mode.
    """
    mask = current_umask()
    path = Path(path)

    def fix(p: Path, force: bool) -> None:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode) or (not force and st.st_mode & 0o077):
            return
        os.chmod(p, (0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~mask)

    fix(path, True)
    if recursive and path.is_dir():
        for sub in path.rglob("*"):
            fix(sub, False)


def describe_os_error(err: OSError) -> str:
    """`strerror` (e.g. "Permission denied"), else the error's text."""
    return err.strerror or str(err)


def host_id() -> str:
    """This host as temp names and locks record it: `<host name>~<boot id>~<pid namespace>`
    (8 hex digits of the kernel's boot id; the inode of /proc/self/ns/pid), parts /proc does not
    give left out. Two containers with one host name differ in their pid namespace on the same
    machine and in their boot id on two machines, so neither takes the other's live pids for
    dead ones."""
    host = re.sub(r"[^\w.-]", "_", socket.gethostname())
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            host += "~" + f.read().strip().replace("-", "")[:8]
    except OSError:
        pass
    try:
        host += "~" + str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pass
    return host


def temp_prefix(dest: Path) -> str:
    """`.<name>.tmp-<host id>-<pid>-`: who wrote a temporary name, for `remove_stale_temps`."""
    return f".{dest.name}.tmp-{host_id()}-{os.getpid()}-"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so renames and new names in it survive a power cut (best effort: some
    file systems refuse to open or sync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove temporary files/folders beside `dest` left by a killed writer on this host.

    Only names `.<dest name>.tmp-<this host>-<pid>-*` whose pid is no longer running are
    removed, so a concurrent writer (another process, or another node of a shared file system)
    keeps its own. Returns what was removed.
    """
    dest = Path(dest)
    pattern = re.compile(re.escape(f".{dest.name}.tmp-{host_id()}-") + r"(\d+)-")
    removed = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def _make_parent(dest: Path, create_parent: bool) -> None:
    parent = dest.parent
    if parent.is_dir():
        return
    if not create_parent:
        raise OutputError(f"cannot write {dest}: folder {parent} does not exist")
    probe = parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write {dest}: {probe} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {dest}: {describe_os_error(err)}") from None


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success rename it to `dest`.

    On error the temporary folder is removed and `dest` is untouched. With `overwrite`, an
    existing `dest` is replaced only after the new one is complete. Temporary folders a killed
    writer left beside `dest` are removed first.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"cannot write folder {dest}: it exists and is not a folder")
    if overwrite and dest.is_dir():
        check_replaceable(dest)
    _make_parent(dest, create_parent=True)
    remove_stale_temps(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
    except OSError as err:
        raise OutputError(f"cannot write {dest}: {describe_os_error(err)}") from None
    try:
        yield tmp
        apply_umask(tmp, recursive=True)
        if dest.exists():
            if not overwrite:
                raise FileExistsError(f"{dest} exists")
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(
    dest: str | os.PathLike, mode: str = "w", create_parent: bool = True
) -> Iterator[Any]:
    """Open a temporary file beside `dest` for writing; on success rename it to `dest`.

    `dest` must be a new name or a regular file (a symlink, device or folder is refused, never
    replaced). `create_parent=False` refuses a missing parent folder instead of creating it.
    """
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        what = "a symlink" if dest.is_symlink() else "not a regular file"
        raise OutputError(f"cannot write {dest}: it is {what}")
    _make_parent(dest, create_parent)
    remove_stale_temps(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest), dir=dest.parent)
    except OSError as err:
        raise OutputError(f"cannot write {dest}: {describe_os_error(err)}") from None
    f = None
    try:
        f = os.fdopen(fd, mode)
        yield f  # an error of the caller's own passes through unchanged
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            apply_umask(tmp)
            os.replace(tmp, dest)
        except OSError as err:
            raise OutputError(f"cannot write {dest}: {describe_os_error(err)}") from None
        fsync_dir(dest.parent)
    except BaseException as err:
        if f is None:
            with contextlib.suppress(OSError):
                os.close(fd)
        else:
            # The buffer may still hold what a full disk refused: a failing close() (which
            # still closes the descriptor) must not replace the one-line error with a raw one.
            with contextlib.suppress(OSError, ValueError):
                f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            # A write of the caller's (json.dump, f.write) that hit a full disk or quota.
            raise OutputError(f"cannot write {dest}: {describe_os_error(err)}") from None
        raise


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(dest) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Check early (before hours of work) that folder `path` exists or can be made and is
    writable; `flag` names it in the UserError. Leaves nothing: a probe file in the nearest
    existing ancestor is created and removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {path}: {probe} is not a folder")
    try:  # a real write: os.access says yes to root on a read-only mount or /sys
        with tempfile.TemporaryFile(dir=probe, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise OutputError(
            f"{flag} {path}: cannot write in {probe}: {describe_os_error(err)}"
        ) from None
    return path


# What the kit writes into an output folder (converted models, LoRA exports, indexes): any other
# entry means the folder is the user's own, and --overwrite would delete it.
OUTPUT_SUFFIXES = (
    ".json", ".safetensors", ".bin", ".pt", ".model", ".jinja", ".index", ".faiss", ".parquet",
    ".gguf", ".txt",
)  # fmt: skip
OUTPUT_TXT = ("merges.txt", "vocab.txt")


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` the kit's outputs never hold (sub-folders, notes, other files)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") and ".tmp-" in p.name:
            continue  # a writer's temporary name
        ok = p.is_file() and not p.is_symlink() and p.name.endswith(OUTPUT_SUFFIXES)
        if ok and p.name.endswith(".txt"):
            ok = p.name in OUTPUT_TXT
        if not ok:
            out.append(p.name + ("/" if p.is_dir() else ""))
    return out


def check_replaceable(folder: Path) -> None:
    """`--overwrite` replaces `folder` whole: refused unless it looks like an earlier output."""
    try:
        foreign = foreign_entries(folder)
    except OSError as err:
        raise OutputError(f"output folder {folder}: {describe_os_error(err)}") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputError(
            f"output folder {folder} holds {shown}, which the kit does not write; --overwrite "
            "replaces only an earlier output: move those away or choose another folder"
        )


def check_output_folder(out: str | os.PathLike, overwrite: bool) -> None:
    """An output folder to be written whole: refused when it is a file, when it exists with
    something in it (unless `overwrite`, and then only when it looks like an earlier output),
    or when it cannot be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"output folder {out} exists and is not empty (pass --overwrite)")
        check_replaceable(out)
    check_writable_dir(out, "output")
