"""Task specs: what `--task-name` means.

A spec is comma-separated entries `NAME[:FORMAT][:WEIGHT]`. NAME is a `.jsonl`, `.jsonl.gz` or
`.parquet` file, a folder holding such files (searched recursively), a glob of such files, or a hub
dataset id `owner/name` (streamed). WEIGHT defaults to 1.0; weights are normalised to sum to one.
FORMAT says how records become training text: `text` (default: OIG text or chat messages) or
`moderation` (labelled records packed in the GPT-JT-Moderation format, see
`openchatkit.data.moderation`). A FORMAT is a word, a WEIGHT a number, so both parse unambiguously:
`data/moderation-sample/train.jsonl:moderation:0.5`.

Parsing touches the local filesystem only (existence, emptiness); it never contacts the hub.
"""

from __future__ import annotations

import glob
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from openchatkit.errors import UserError

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
# `owner/name`, the shape of a hub dataset id (no further slashes, no data-file suffix).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FORMATS = ("text", "moderation")


@dataclass(frozen=True)
class TaskEntry:
    """One entry of a task spec.

    `weight` is the user's weight; `probability` is the normalised one (weights summed to 1).
    `kind` is "files" (local, `files` lists them in reading order) or "hub" (`name` is the id).
    `format` is one of FORMATS.
    """

    name: str
    weight: float
    probability: float = 0.0
    kind: str = "files"
    files: tuple[Path, ...] = field(default_factory=tuple)
    format: str = "text"


def is_data_file(path: Path) -> bool:
    """True for the file types the loader reads."""
    return path.name.endswith(DATA_SUFFIXES)


def _split_entry(entry: str, flag: str = "--task-name") -> tuple[str, float, str]:
    name, weight, fmt = entry, 1.0, "text"
    if ":" in name:
        rest, _, raw = name.rpartition(":")
        if raw.strip() not in FORMATS:
            try:
                weight = float(raw)
            except ValueError:
                raise UserError(
                    f"{flag} entry {entry!r}: weight {raw!r} is not a number and not a "
                    f"format ({', '.join(FORMATS)}); write NAME[:FORMAT][:WEIGHT], e.g. "
                    "data/OIG-sample/train.jsonl:0.5 or data/moderation-sample/train.jsonl:moderation"
                ) from None
            name = rest
    if ":" in name:
        rest, _, raw = name.rpartition(":")
        if raw.strip() in FORMATS:
            name, fmt = rest, raw.strip()
    name = name.strip()
    if not name:
        raise UserError(f"{flag} entry {entry!r} has no file, folder or dataset name")
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"{flag} entry {entry!r}: weight must be a finite number >= 0")
    return name, weight, fmt


def resolve_files(name: str, flag: str = "--task-name") -> tuple[Path, ...]:
    """The data files a local NAME stands for, in reading order (sorted paths).

    Raises UserError when NAME exists but holds no usable data, or is an empty file.
    """
    path = Path(name).expanduser()
    if path.is_file():
        if not is_data_file(path):
            raise UserError(f"{flag}: {name} is not a .jsonl, .jsonl.gz or .parquet file")
        files = (path,)
    elif path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p)))
        if not files:
            raise UserError(f"{flag}: folder {name} holds no .jsonl, .jsonl.gz or .parquet file")
    elif glob.has_magic(name):
        files = tuple(sorted(Path(p) for p in glob.glob(str(path)) if is_data_file(Path(p))))
        if not files:
            raise UserError(f"{flag}: no .jsonl, .jsonl.gz or .parquet file matches {name}")
    else:
        raise UserError(f"{flag}: no such file or folder: {name}")
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{flag}: data file {f} is empty")
    return files


def _looks_like_hub_id(name: str) -> bool:
    if not _HUB_ID.match(name) or name.endswith(DATA_SUFFIXES) or name.startswith("."):
        return False
    # `data/missing` would also have the `owner/name` shape: when its first part is a local
    # folder the user meant a local path, so report the missing path instead of going online.
    return not Path(name.split("/", 1)[0]).exists()


def parse_task_spec(spec: str, flag: str = "--task-name") -> list[TaskEntry]:
    """Parse `--task-name`: entries `NAME[:FORMAT][:WEIGHT]` separated by commas, weights
    normalised. `flag` is the flag errors name (`--evaluation-data` takes the same specs).

    Raises UserError naming the entry for an unparsable or negative weight, a zero weight sum,
    or a missing/empty file.
    """
    raw_entries = [e.strip() for e in (spec or "").split(",")]
    if not any(raw_entries):
        raise UserError(f"{flag} is empty: give at least one file, folder or dataset id")
    parsed: list[tuple[str, float, str, tuple[Path, ...], str]] = []
    for entry in raw_entries:
        if not entry:
            raise UserError(f"{flag} {spec!r} has an empty entry (stray comma?)")
        name, weight, fmt = _split_entry(entry, flag)
        local = Path(name).expanduser()
        if local.exists() or glob.has_magic(name) or not _looks_like_hub_id(name):
            parsed.append((name, weight, "files", resolve_files(name, flag), fmt))
        else:
            parsed.append((name, weight, "hub", (), fmt))
    total = sum(w for _, w, _, _, _ in parsed)
    if total <= 0:
        raise UserError(f"{flag} {spec!r}: the weights sum to zero; give a positive weight")
    return [
        TaskEntry(name=n, weight=w, probability=w / total, kind=k, files=f, format=fmt)
        for n, w, k, f, fmt in parsed
    ]
