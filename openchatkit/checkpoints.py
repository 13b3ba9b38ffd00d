"""The trainer-checkpoint layout, read side: find, list, verify and read checkpoints (no torch).

A trainer `--checkpoint-path` holds:
    checkpoint_<step>/            a layer-sharded model folder (or LoRA adapters) plus
        optimizer/stage_<pp>.pt   optimizer state and fp32 masters (tensors only)
        rng/rank_<rank>.pt        RNG states of each rank (tensors and ints only)
        meta.json                 step, layout, flags ... and `files`: size and sha256 of every
                                  other file (format_version 1)
    latest                        the name of the newest published checkpoint (a hint only)
    .checkpoint_<step>.tmp/       a checkpoint being written
    .checkpoint_<step>.damaged/   one a resume found damaged, set aside (never read again)

The write side (torch) is `openchatkit.training.checkpoint`. Everything here is cheap to import,
so the converter, the evaluator and the moderation tools can recognise and pick a checkpoint
without torch. Checkpoint folders are untrusted input: `latest` only ever names a
`checkpoint_<n>` directly inside the folder, a format_version 1 meta.json must list its files
(else the checkpoint is refused, never read unverified), and listed names may not leave the
folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from openchatkit.errors import UserError

PREFIX = "checkpoint_"
LATEST = "latest"
META = "meta.json"
HASHES = ".hashes"  # per-rank hash shares while a checkpoint is written
DAMAGED = ".damaged"  # suffix of a checkpoint set aside by a resume
FORMAT_VERSION = 1
HASH_BLOCK = 8 << 20  # bytes read at a time when hashing
NAME_RE = re.compile(rf"{PREFIX}(\d+)")


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """`<root>/checkpoint_<step>`."""
    return Path(root) / f"{PREFIX}{step}"


def is_checkpoint_root(folder: str | os.PathLike) -> bool:
    """True for a trainer --checkpoint-path: it holds a complete `checkpoint_<n>/`."""
    return bool(list_checkpoints(folder))


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (real folders with meta.json), oldest first. A
    symlinked `checkpoint_<n>` is not listed: it could lead anywhere."""
    root = Path(root)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = NAME_RE.fullmatch(p.name)
            if m and not p.is_symlink() and p.is_dir() and (p / META).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def read_latest(root: str | os.PathLike) -> Path | None:
    """The folder `<root>/latest` names when that is a `checkpoint_<n>` (or a step number)
    directly inside `root`; None when there is no such file or it names anything else (an
    absolute path, `..`, another folder)."""
    root = Path(root)
    latest = root / LATEST
    if latest.is_symlink() or not latest.is_file():
        return None
    try:
        with open(latest, "rb") as f:
            text = f.read(256).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text.isdigit():
        text = f"{PREFIX}{text}"
    if not NAME_RE.fullmatch(text):
        return None
    folder = root / text
    return folder if folder.is_dir() and not folder.is_symlink() else None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in HASH_BLOCK pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def load_json(path: Path) -> Any:
    """A small JSON file, or ValueError for anything unreadable: not JSON, not UTF-8, nested
    too deep (RecursionError) or an OSError."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{type(err).__name__}: {err}"[:200]) from None


def safe_relative(rel: Any) -> bool:
    """A name listed in meta.json that stays inside its folder: relative, no `..`."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    parts = rel.split("/")
    return not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def listed_files(folder: Path, require_files: bool = True) -> dict[str, dict] | str | None:
    """meta.json's `files` (name -> {size, sha256}), or a problem in a few words; None for a
    checkpoint that predates the file list when `require_files` is off."""
    try:
        meta = load_json(folder / META)
    except ValueError:
        return f"unreadable {META}"
    if not isinstance(meta, dict):
        return f"unreadable {META}"
    files = meta.get("files")
    if files is None:
        if require_files and meta.get("format_version") == FORMAT_VERSION:
            return f"{META} lists no files (not written by this kit's trainer)"
        return None
    if not isinstance(files, dict) or not all(
        safe_relative(rel) and isinstance(want, dict) for rel, want in files.items()
    ):
        return f"{META} has a bad file list"
    return files


def verify_checkpoint(
    folder: Path,
    hashes: bool | None = None,
    require_files: bool = True,
    share: tuple[int, int] | None = None,
) -> str | None:
    """None when manifest.json (or adapter.json) and every file meta.json lists are there with
    their sizes (and sha256, unless `hashes` is False or OPENCHATKIT_VERIFY_HASHES=0); else what
    is wrong, in a few words. `share=(rank, world)` hashes only every world-th file from the
    rank-th, so the ranks of a run split the reading. A format_version 1 meta.json without its
    file list is refused unless `require_files` is off (readers that load safetensors only)."""
    folder = Path(folder)
    if hashes is None:
        hashes = os.environ.get("OPENCHATKIT_VERIFY_HASHES", "1") != "0"
    files = listed_files(folder, require_files)
    if isinstance(files, str):
        return files
    # A full checkpoint is a layer-sharded folder; a LoRA one holds adapter.json instead.
    if not any((folder / name).is_file() for name in ("manifest.json", "adapter.json")):
        return "manifest.json is missing"
    if files is None:
        return None
    for rel, want in files.items():
        path = folder / rel
        if path.is_symlink():
            return f"{rel} is a symlink"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want.get("size"):
            return f"{rel} has {size} bytes, {want.get('size')} expected"
    if hashes:
        names = sorted(files)
        if share is not None:
            names = names[share[0] :: share[1]]
        for rel in names:
            want = files[rel].get("sha256")
            if want and file_sha256(folder / rel) != want:
                return f"{rel} differs from its recorded sha256"
    return None


def find_latest(
    root: str | os.PathLike, verify: bool = True, require_files: bool = True
) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`, else None (a fresh run).

    The newest complete checkpoint wins even when `latest` names an older one (`latest` may
    not have been rewritten: a full disk, a crash between the rename and it). Skipping a bad
    one costs one warning naming it; when every checkpoint is bad the run stops with a
    UserError rather than silently starting over.
    """
    from loguru import logger

    root = Path(root)
    bad: list[str] = []
    for _, folder in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(folder, require_files=require_files) if verify else None
        if problem is None:
            if bad:
                logger.warning("skipping damaged {}; resuming from {}", "; ".join(bad), folder)
            return folder
        bad.append(f"{folder.name}: {problem}")
    if bad:
        raise UserError(
            f"--checkpoint-path {root}: no intact checkpoint ({'; '.join(bad)}); move the "
            "folder away to start afresh"
        )
    return None


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a checkpoint, checked to be this kit's format; UserError otherwise."""
    path = Path(folder) / META
    try:
        meta = load_json(path)
    except ValueError as err:
        raise UserError(f"checkpoint {folder}: unreadable {META} ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(f"checkpoint {folder}: unknown format_version {version}")
    return meta
