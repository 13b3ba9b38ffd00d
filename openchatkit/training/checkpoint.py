"""Training checkpoints: `<checkpoint-path>/checkpoint_<step>/`, resumable under any layout.

A checkpoint folder is a layer-sharded model folder (written by `save_stage`, so
`tools/convert_to_hf_*.py --ckpt-path` reads it directly) plus:
    optimizer/stage_<pp rank>.pt  optimizer state and fp32 masters keyed by parameter name
    rng/rank_<rank>.pt            torch / numpy / python RNG states of each rank, as tensors
                                  and ints only (read with `weights_only=True`: no pickle runs)
    meta.json                     step, layout, scheduler, loss scale, data-iterator state, flags,
                                  and `files`: the size and sha256 of every other file
and `<checkpoint-path>/latest` names the newest complete one. Before resuming, the sizes and
hashes are checked (`verify_checkpoint`); a damaged checkpoint is skipped with one warning for
the newest intact earlier one (`find_latest`).

The read side of the layout (find, list, verify, read meta.json) is `openchatkit.checkpoints`,
free of torch; its names are re-exported here.

Atomicity: every rank writes into `.checkpoint_<step>.tmp/` and fsyncs what it wrote; after a
barrier rank 0 writes meta.json last, fsyncs the folders, renames the folder to
`checkpoint_<step>`, fsyncs the root and rewrites `latest` (fsynced too); only then are older
checkpoints deleted, so a power cut never leaves fewer intact checkpoints than before the save. A kill at
any moment leaves either no `checkpoint_<step>` or a complete one (meta.json present), and
`latest` only ever names complete folders. The folder must be on a file system every rank sees.

State is kept by parameter name (`embed.*`, `layers.<i>.*`, `head.*`), so another pipeline x data
layout picks the entries of its own parameters; the last stage's copy of a tied embedding takes
the embedding's state.
"""

from __future__ import annotations

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

from openchatkit.checkpoints import (
    DAMAGED,
    FORMAT_VERSION,
    HASHES,
    LATEST,
    META,
    PREFIX,
    checkpoint_dir,
    file_sha256,
    find_latest,
    list_checkpoints,
    read_meta,
    verify_checkpoint,
)
from openchatkit.errors import UserError
from openchatkit.fileio import OutputError, atomic_file, describe_os_error, fsync_dir, write_json

__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "checkpoint_dir",
    "file_sha256",
    "find_latest",
    "list_checkpoints",
    "read_meta",
    "verify_checkpoint",
]


def checkpoint_files(folder: Path) -> list[str]:
    """The files of a checkpoint folder being written (relative, sorted), meta.json and the
    hash shares excluded: the same list on every rank once all have written."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != META and not rel.startswith(HASHES + "/"):
            out.append(rel)
    return sorted(out)


def _hash_and_sync(path: Path) -> dict[str, Any]:
    """Size and sha256 of a written file, after fsyncing it (a read fd suffices on Linux)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def hash_share(tmp: Path, rank: int, world_size: int) -> None:
    """Every rank, after all wrote: size and sha256 of every `world_size`-th file, so the
    hashing of a large checkpoint is spread over the ranks. Written to `.hashes/rank_<r>.json`.
    Each file is fsynced first, so what is hashed is what a power cut leaves on disk."""
    files = checkpoint_files(tmp)[rank::world_size]
    record = {rel: _hash_and_sync(tmp / rel) for rel in files}
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
            files[rel] = _hash_and_sync(tmp / rel)
    shutil.rmtree(tmp / HASHES, ignore_errors=True)
    return dict(sorted(files.items()))


def remove_stale_temps(root: str | os.PathLike) -> None:
    """While holding the folder's lock: temp and old folders a killed run left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if re.fullmatch(rf"\.{PREFIX}\d+\.(tmp|old)", p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Rank 0, holding the lock: rename a damaged checkpoint to `.checkpoint_<n>.damaged` so no
    later resume or retention counts it (it is kept for inspection; delete it by hand)."""
    aside = folder.with_name(f".{folder.name}{DAMAGED}")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(folder, aside)
    except OSError as err:
        logger.warning("could not set {} aside: {}", folder, describe_os_error(err))
        return folder
    logger.warning("set the damaged {} aside as {}", folder.name, aside.name)
    return aside


def resume_candidates(root: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Before any process group, on every rank alike: the complete checkpoints whose files are
    all there with their sizes (newest first), and the (folder, problem) of those that are not.
    Only stat calls: the hashes are checked in shares (`verify_checkpoint(share=...)`). A
    UserError when there are checkpoints but none passes."""
    good, bad = [], []
    for _, folder in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(folder, hashes=False)
        if problem is None:
            good.append(folder)
        else:
            bad.append((folder, problem))
    if bad and not good:
        raise UserError(
            f"--checkpoint-path {root}: no intact checkpoint "
            f"({'; '.join(f'{f.name}: {p}' for f, p in bad)}); move the folder away to start afresh"
        )
    return good, bad


class ResumeCheck:
    """Which checkpoint a run resumes from, verified without slowing the start of a large run.

    `precheck`, before `init_process_group`: every rank lists the checkpoints whose files have
    their sizes (the same list everywhere) and hashes its 1/world share of the newest one, so
    hashing a large checkpoint neither repeats on every rank nor races --pg-timeout. `agree`,
    once a collective exists: the newest checkpoint no rank found damaged; damaged ones are
    skipped with one warning and set aside by rank 0 (which holds the folder's lock).
    """

    def __init__(self, root: str | os.PathLike, rank: int, world_size: int) -> None:
        self.root, self.rank, self.world = Path(root), rank, world_size
        self.candidates: list[Path] = []  # newest first
        self.size_damaged: list[tuple[Path, str]] = []
        self.share_problem: str | None = None  # this rank's share of candidates[0]
        self.done = False

    def precheck(self) -> None:
        self.done = True
        self.candidates, self.size_damaged = resume_candidates(self.root)
        if self.candidates:
            share = (self.rank, self.world)
            self.share_problem = verify_checkpoint(self.candidates[0], share=share)

    def agree(self, any_rank) -> Path | None:
        """`any_rank(flag)`: True when `flag` is True on any rank (an all-reduce)."""
        if not self.done:
            self.precheck()
        bad = list(self.size_damaged)
        chosen = None
        for i, folder in enumerate(self.candidates):
            share = (self.rank, self.world)
            problem = self.share_problem if i == 0 else verify_checkpoint(folder, share=share)
            if not any_rank(problem is not None):
                chosen = folder
                break
            bad.append((folder, problem or "a file another rank hashed differs from meta.json"))
        names = "; ".join(f"{f.name}: {p}" for f, p in bad)
        if chosen is None and bad:
            raise UserError(
                f"--checkpoint-path {self.root}: no intact checkpoint ({names}); move the folder "
                "away to start afresh"
            )
        if bad and self.rank == 0:
            logger.warning("skipping damaged {}; resuming from {}", names, chosen)
            for folder, _ in bad:  # never resumed from nor kept by retention again
                set_aside(folder)
        return chosen


# -- RNG state: tensors and ints only, so `torch.load(weights_only=True)` reads it ---------------


def rng_state() -> dict[str, Any]:
    """This process's torch / numpy / python (/ CUDA) RNG states as tensors, ints and floats."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "format": 2,
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        # python's Mersenne Twister: 625 ints and an optional cached gauss.
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": [] if gauss is None else [float(gauss)]},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (ValueError/KeyError/TypeError when it is malformed)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            np_state["kind"],
            keys,
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    py = state["python"]
    gauss = py["gauss"][0] if py["gauss"] else None
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_synced(obj: Any, path: Path) -> None:
    """torch.save, then flush and fsync the file."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_stage_state(
    tmp: Path,
    pp_rank: int,
    optimizer_state: dict[str, dict[str, Any]],
    masters: dict[str, torch.Tensor],
) -> None:
    """The optimizer state and fp32 masters of one stage (written by its dp rank 0)."""
    (tmp / "optimizer").mkdir(parents=True, exist_ok=True)
    save_synced(
        {"state": optimizer_state, "master": masters},
        tmp / "optimizer" / f"stage_{pp_rank:03d}.pt",
    )


def write_rank_state(tmp: Path, rank: int) -> None:
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    save_synced(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")


def temp_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f".{PREFIX}{step}.tmp"


def prepare_temp(root: str | os.PathLike, step: int) -> Path:
    """Rank 0, before the others write: an empty temp folder (a killed run's leftover goes)."""
    tmp = temp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def retained(root: Path, final: Path, keep: int) -> list[Path]:
    """The checkpoints retention keeps: `final` (just published: always) and the newest others
    whose files are all there with their sizes, `keep` in all. A damaged one never counts, so
    it never pushes out an intact one."""
    kept = [final]
    for _, folder in reversed(list_checkpoints(root)):
        if len(kept) >= keep:
            break
        if folder != final and verify_checkpoint(folder, hashes=False) is None:
            kept.append(folder)
    return kept


def publish(root: str | os.PathLike, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Rank 0, after every rank wrote: meta.json, fsync, rename, `latest`, fsync, retention.

    A full disk (or any OSError) becomes a one-line OutputError; `latest` and the older
    checkpoints are then untouched, and the newest complete checkpoint is what a resume uses.
    """
    root = Path(root)
    tmp = temp_dir(root, step)
    final = checkpoint_dir(root, step)
    try:
        files = collect_hashes(tmp)
        write_json(tmp / META, {"format_version": FORMAT_VERSION, **meta, "files": files})
        for sub in sorted({(tmp / rel).parent for rel in files}) + [tmp]:
            fsync_dir(sub)
        if final.exists():  # the same step written by a run that died before updating `latest`
            old = root / f".{PREFIX}{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        with atomic_file(root / LATEST) as f:  # fsyncs the file and the folder
            f.write(final.name + "\n")
    except OSError as err:
        raise OutputError(f"cannot write checkpoint {final}: {describe_os_error(err)}") from None
    if keep > 0:
        kept = retained(root, final, keep)
        for _, old in list_checkpoints(root):
            if old not in kept:
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
    """The RNG state of `rank`, read with `weights_only=True` (a pickled object in the file is
    refused, never run); None (the caller reseeds, with a warning) when the file is missing or
    is not this format (an older kit wrote numpy objects there)."""
    path = folder / "rng" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError...: not a plain state
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        logger.warning("{}: not a plain RNG state, not loaded ({})", path, first[:200])
        return None
    if not isinstance(state, dict) or state.get("format") != 2:
        logger.warning("{}: not an RNG state of this format, not loaded", path)
        return None
    return state
