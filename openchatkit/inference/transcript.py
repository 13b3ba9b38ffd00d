"""Files of the REPL's `/save` and `/load`: the saved chat's record (built, and checked field by
field when loaded), one path from the command's words, a bounded read that never blocks (a FIFO,
a device or a huge file is refused before it is read), and a write that never exposes a
transcript with wider permissions than it will have.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
import tempfile
from pathlib import Path

from openchatkit.conversation import Message
from openchatkit.fileio import temp_prefix
from openchatkit.inference.generation import SETTERS, GenerationSettings

SAVE_FORMAT = "openchatkit-chat"
MAX_LOAD_BYTES = 64 * 2**20  # a saved chat larger than this is not one
MAX_MODEL_NAME = 256  # characters of a saved chat's "model" field
NEW_TRANSCRIPT_MODE = 0o600  # like readline's history file: chats are private


def chat_record(
    model: str, system: str | None, settings: GenerationSettings, messages: list[Message]
) -> dict:
    """What /save writes: format, model name, system message, settings and the turns."""
    return {
        "format": SAVE_FORMAT,
        "version": 1,
        "model": model,
        "system": system,
        "settings": settings.as_dict(),
        "messages": messages,
    }


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


def validate_saved(record) -> tuple[list[Message], GenerationSettings, str | None]:
    """Check a /save record; ValueError says what is wrong."""
    if not isinstance(record, dict) or record.get("format") != SAVE_FORMAT:
        raise ValueError(f'no "format": "{SAVE_FORMAT}" field')
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' is not a list")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"message {i} is not {{role: user|assistant, content: text}}")
    settings = GenerationSettings()
    for key, value in (record.get("settings") or {}).items():
        if key not in SETTERS:
            raise ValueError(f"unknown setting '{key}'")
        try:
            setattr(settings, key, SETTERS[key](str(value) if value is not None else "none"))
        except ValueError as exc:
            raise ValueError(f"setting {key}={value!r}: {exc}") from exc
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("'system' is not text")
    model = record.get("model")
    if model is not None and not (isinstance(model, str) and len(model) <= MAX_MODEL_NAME):
        raise ValueError(f"'model' is not a name of at most {MAX_MODEL_NAME} characters")
    return messages, settings, system
