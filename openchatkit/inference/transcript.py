"""Files of the REPL's `/save` and `/load`: one path from the command's words, a bounded
read that never blocks (a FIFO, a device or a huge file is refused before it is read), and a
write that never exposes a transcript with wider permissions than it will have.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
import tempfile
from pathlib import Path

from openchatkit.fileio import temp_prefix


def one_path(arg: str, command: str) -> Path | None:
    """The one FILE of `/save`/`/load` (shell quoting), or None when there is not exactly one.
    A quoting error is a ValueError naming the command."""
    try:
        words = shlex.split(arg)
    except ValueError as exc:
        raise ValueError(f'{exc}; quote the name: {command} "it\'s mine.json"') from None
    return Path(words[0]).expanduser() if len(words) == 1 and words[0] else None


def read_small_file(path: Path, limit: int) -> str:
    """The text of regular file `path` of at most `limit` bytes. Opened without blocking and
    checked before reading: a FIFO, a device or a folder is an OSError, never read or waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise OSError(f"{path} is larger than {limit // 2**20} MB")
        chunks, size = [], 0
        while size <= limit:  # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(f"{path} is larger than {limit // 2**20} MB")
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def is_saved_chat(path: Path, save_format: str, limit: int) -> bool:
    """True when `path` holds a chat written by /save (so /save may replace it)."""
    try:
        record = json.loads(read_small_file(path, limit))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("format") == save_format


def write_private(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` through a temp file beside it that has `mode` from the start
    (never wider for a moment), fsynced, then renamed over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)  # 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
