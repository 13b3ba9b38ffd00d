"""Training checkpoints: `<checkpoint-path>/checkpoint_<step>/`, resumable under any layout.

A checkpoint folder is a layer-sharded model folder (written by `save_stage`, so
`tools/convert_to_hf_*.py --ckpt-path` reads it directly) plus:
    optimizer/stage_<pp rank>.pt  optimizer state and fp32 masters keyed by parameter name
    rng/rank_<rank>.pt            torch / numpy / python RNG states of each rank
    meta.json                     step, layout, scheduler, loss scale, data-iterator state, flags,
                                  and `files`: the size and sha256 of every other file
and `<checkpoint-path>/latest` names the newest complete one. Before resuming, the sizes and
hashes are checked (`verify_checkpoint`); a damaged checkpoint is skipped with one warning for
the newest intact earlier one (`find_latest`).

Atomicity: every rank writes into `.checkpoint_<step>.tmp/`; after a barrier rank 0 writes
meta.json last, renames the folder to `checkpoint_<step>` and then rewrites `latest`. A kill at
any moment leaves either no `checkpoint_<step>` or a complete one (meta.json present), and
`latest` only ever names complete folders. The folder must be on a file system every rank sees.

State is kept by parameter name (`embed.*`, `layers.<i>.*`, `head.*`), so another pipeline x data
layout picks the entries of its own parameters; the last stage's copy of a tied embedding takes
the embedding's state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from openchatkit.errors import UserError
from openchatkit.fileio import atomic_file, write_json

PREFIX = "checkpoint_"
LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 1


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (those with meta.json), oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(rf"{PREFIX}(\d+)", p.name)
            if m and p.is_dir() and (p / META).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(root: str | os.PathLike, verify: bool = True) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`, else None (a fresh run).

    `latest` is tried first, then the complete checkpoints newest first. Skipping a bad one
    (a truncated or missing file, a hash that differs from meta.json) costs one warning naming
    it; when every checkpoint is bad the run stops with a UserError rather than silently
    starting over.
    """
    root = Path(root)
    candidates: list[Path] = []
    latest = root / LATEST
    if latest.is_file():
        try:
            named = root / latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and (named / META).is_file():
            candidates.append(named)
        else:
            logger.warning("{} names {}, which is incomplete", latest, named)
    candidates += [p for _, p in reversed(list_checkpoints(root)) if p not in candidates]
    bad: list[str] = []
    for folder in candidates:
        problem = verify_checkpoint(folder) if verify else None
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


HASH_BLOCK = 8 << 20  # bytes read at a time when hashing


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """The files of a checkpoint folder being written (relative, sorted), meta.json and the
    hash shares excluded: the same list on every rank once all have written."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != META and not rel.startswith(HASHES + "/"):
            out.append(rel)
    return sorted(out)


HASHES = ".hashes"


def hash_share(tmp: Path, rank: int, world_size: int) -> None:
    """Every rank, after all wrote: size and sha256 of every `world_size`-th file, so the
    hashing of a large checkpoint is spread over the ranks. Written to `.hashes/rank_<r>.json`."""
    files = checkpoint_files(tmp)[rank::world_size]
    record = {
        rel: {"size": (tmp / rel).stat().st_size, "sha256": file_sha256(tmp / rel)} for rel in files
    }
    (tmp / HASHES).mkdir(exist_ok=True)
    write_json(tmp / HASHES / f"rank_{rank:05d}.json", record)


def collect_hashes(tmp: Path) -> dict[str, dict[str, Any]]:
    """Rank 0: the shares merged (files no share covers, e.g. in a single process, hashed
    here), then the share folder removed."""
    files: dict[str, dict[str, Any]] = {}
    for share in sorted((tmp / HASHES).glob("rank_*.json")):
        files.update(json.loads(share.read_text()))
    for rel in checkpoint_files(tmp):
        if rel not in files:
            files[rel] = {"size": (tmp / rel).stat().st_size, "sha256": file_sha256(tmp / rel)}
    shutil.rmtree(tmp / HASHES, ignore_errors=True)
    return dict(sorted(files.items()))


def verify_checkpoint(folder: Path, hashes: bool | None = None) -> str | None:
    """None when manifest.json and every file meta.json lists are there with their sizes (and
    sha256, unless `hashes` is False or OPENCHATKIT_VERIFY_HASHES=0); else what is wrong, in a
    few words. Files of checkpoints written before sizes were recorded are not checked."""
    if hashes is None:
        hashes = os.environ.get("OPENCHATKIT_VERIFY_HASHES", "1") != "0"
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return f"unreadable {META}"
    # A full checkpoint is a layer-sharded folder; a LoRA one holds adapter.json instead.
    if not any((folder / name).is_file() for name in ("manifest.json", "adapter.json")):
        return "manifest.json is missing"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        return None
    for rel, want in files.items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want.get("size"):
            return f"{rel} has {size} bytes, {want.get('size')} expected"
    if hashes:
        for rel, want in files.items():
            if want.get("sha256") and file_sha256(folder / rel) != want["sha256"]:
                return f"{rel} differs from its recorded sha256"
    return None


def remove_stale_temps(root: str | os.PathLike) -> None:
    """While holding the folder's lock: temp and old folders a killed run left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if re.fullmatch(rf"\.{PREFIX}\d+\.(tmp|old)", p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {folder}: unreadable {META} ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {folder}: unknown format_version {meta.get('format_version')}")
    return meta


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_stage_state(
    tmp: Path,
    pp_rank: int,
    optimizer_state: dict[str, dict[str, Any]],
    masters: dict[str, torch.Tensor],
) -> None:
    """The optimizer state and fp32 masters of one stage (written by its dp rank 0)."""
    (tmp / "optimizer").mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state": optimizer_state, "master": masters},
        tmp / "optimizer" / f"stage_{pp_rank:03d}.pt",
    )


def write_rank_state(tmp: Path, rank: int) -> None:
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")


def temp_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f".{PREFIX}{step}.tmp"


def prepare_temp(root: str | os.PathLike, step: int) -> Path:
    """Rank 0, before the others write: an empty temp folder (a killed run's leftover goes)."""
    tmp = temp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(root: str | os.PathLike, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Rank 0, after every rank wrote: meta.json, rename, `latest`, retention."""
    root = Path(root)
    tmp = temp_dir(root, step)
    files = collect_hashes(tmp)
    write_json(tmp / META, {"format_version": FORMAT_VERSION, **meta, "files": files})
    final = checkpoint_dir(root, step)
    if final.exists():  # the same step written by a run that died before updating `latest`
        old = root / f".{PREFIX}{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    with atomic_file(root / LATEST) as f:
        f.write(final.name + "\n")
    if keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_stage_states(folder: Path) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Optimizer state and masters of every stage in a checkpoint, merged by name.

    Files are memory-mapped, so only the tensors this rank then copies are read from disk.
    """
    states: dict[str, dict] = {}
    masters: dict[str, torch.Tensor] = {}
    files = sorted((folder / "optimizer").glob("stage_*.pt"))
    if not files:
        raise UserError(f"checkpoint {folder}: no optimizer/stage_*.pt")
    for path in files:
        try:
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"checkpoint {folder}: unreadable {path.name} (truncated?): {first}"
            ) from None
        states.update(saved["state"])
        masters.update(saved["master"])
    return states, masters


def load_rank_rng(folder: Path, rank: int) -> dict[str, Any] | None:
    path = folder / "rng" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
