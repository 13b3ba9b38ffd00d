"""Document sources: one task's records, read in order, forever (epoch after epoch), resumable.

A source reads `.jsonl`, `.jsonl.gz` and `.parquet` files in a fixed order, or streams a hub
dataset. Its position is a small dict (`state_dict`) so the packed stream can snapshot it and
resume exactly: a byte offset for `.jsonl`, a line count for `.jsonl.gz` (gzip cannot seek, so a
resume re-reads the file up to that line), a row index for `.parquet`, a record count for a hub
stream. Memory stays flat whatever the corpus size: one line or one parquet row group at a time.

Each record becomes a `Document`: plain text (OIG's `{"text": "<human>: ...\\n<bot>: ..."}`) or
chat messages (`{"messages": [{"role": ..., "content": ...}, ...]}`). Malformed records (not JSON,
nested too deep to parse, longer than the line cap of `openchatkit.data.jsonl`, no
`text`/`messages`, empty text) are skipped and counted; `strict` (`--strict-data`) makes the
first one fatal.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from openchatkit.data.jsonl import Invalid, max_line_bytes, parse_line, read_lines, too_long
from openchatkit.data.tasks import TaskEntry
from openchatkit.errors import UserError


@dataclass(frozen=True)
class Document:
    """One training document: `text` (OIG format or plain) or `messages` (role/content dicts).

    A packed moderation window (openchatkit.data.moderation) also sets `spans`, the character
    ranges of its labels (learned under `--loss-on bot`), and `window=True`: it fills one
    `--seq-length` window on its own (cut to fit, then padded with unlearned EOS).
    """

    text: str | None = None
    messages: tuple[dict, ...] | None = None
    spans: tuple[tuple[int, int], ...] | None = None
    window: bool = False


def parse_record(record: Any) -> Document | str:
    """A decoded record as a Document, or a short reason string when it is malformed."""
    if not isinstance(record, dict):
        return "not a JSON object"
    text = record.get("text")
    if text is not None:
        if not isinstance(text, str):
            return "`text` is not a string"
        if not text.strip():
            return "empty `text`"
        return Document(text=text)
    messages = record.get("messages")
    if messages is not None:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            return "`messages` is not a non-empty list of {role, content} objects"
        return Document(messages=tuple(messages))
    return "no `text` (or `messages`) field"


BLANK = object()  # a reader's mark for a blank line: no record, but it counts as a line

# A reader yields (record, or NOT_JSON when the line is not JSON, or BLANK for a blank line;
# position after it) once per line or row. Positions are ints whose meaning depends on the file
# type: byte offset (.jsonl), line count (.jsonl.gz), row index (.parquet).
Reader = Iterator[tuple[Any, int]]


def _read_jsonl(path: Path, offset: int) -> Reader:
    with open(path, "rb") as f:
        f.seek(offset)
        limit = max_line_bytes()
        for raw, size in read_lines(f, limit):
            offset += size
            if raw is None:
                yield too_long(limit), offset
            elif not raw.strip():
                yield BLANK, offset
            else:
                yield parse_line(raw), offset


def _read_jsonl_gz(path: Path, num_lines: int) -> Reader:
    try:
        with gzip.open(path, "rb") as f:
            limit = max_line_bytes()
            for index, (raw, _) in enumerate(read_lines(f, limit)):
                if index < num_lines:
                    continue
                if raw is None:
                    yield too_long(limit), index + 1
                elif not raw.strip():
                    yield BLANK, index + 1
                else:
                    yield parse_line(raw), index + 1
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"cannot read {path}: {err} (a truncated or corrupt .gz?)") from None


def _read_parquet(path: Path, row: int) -> Reader:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a non-parquet file
        raise UserError(f"cannot read {path} as parquet: {err}") from None
    columns = [c for c in ("text", "messages") if c in pf.schema_arrow.names]
    if not columns:
        raise UserError(f"{path} has no `text` or `messages` column")
    start = 0
    for group in range(pf.num_row_groups):
        num_rows = pf.metadata.row_group(group).num_rows
        if start + num_rows <= row:
            start += num_rows
            continue
        for i, rec in enumerate(pf.read_row_group(group, columns=columns).to_pylist()):
            if start + i >= row:
                yield rec, start + i + 1
        start += num_rows


def open_reader(path: Path, position: int) -> Reader:
    """A reader of `path` from `position` (see `Reader`)."""
    if path.name.endswith(".jsonl.gz"):
        return _read_jsonl_gz(path, position)
    if path.name.endswith(".parquet"):
        return _read_parquet(path, position)
    return _read_jsonl(path, position)


class FileSource:
    """The documents of a list of local files, read in order and cycled epoch after epoch."""

    def __init__(self, entry: TaskEntry, strict: bool = False, cycle: bool = True) -> None:
        self.name = entry.name
        self.files = list(entry.files)
        self.strict = strict
        self.cycle = cycle
        self.exhausted = False  # only when not cycling: the one epoch is over
        self.epoch, self.file_index, self.position = 0, 0, 0
        self.line = 0  # 1-based number of the last line (or row) read in the current file
        self._reader: Reader | None = None
        self._docs_this_epoch = 0
        self.malformed: dict[str, int] = {}
        self._warned: set[str] = set()
        self.parse = parse_record  # record -> Document | reason; the moderation packer swaps it

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "file_index": self.file_index,
            "position": self.position,
            "line": self.line,
            "docs_this_epoch": self._docs_this_epoch,
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.file_index = int(state["file_index"])
        self.position = int(state["position"])
        self.line = int(state["line"])
        self._docs_this_epoch = int(state["docs_this_epoch"])
        self.exhausted = bool(state.get("exhausted", False))
        self._reader = None

    def _malformed(self, path: Path, reason: str) -> None:
        if self.strict:
            raise UserError(
                f"{path}:{self.line}: {reason} (--strict-data makes malformed lines fatal)"
            )
        if self.epoch == 0:  # count each bad line once, not once per epoch
            key = str(path)
            self.malformed[key] = self.malformed.get(key, 0) + 1

    def _finish_file(self, path: Path) -> None:
        key = str(path)
        count = self.malformed.get(key, 0)
        if count and key not in self._warned:
            self._warned.add(key)
            logger.warning(
                f"{path}: skipped {count} malformed line(s) (not JSON, too long, no `text`, or "
                "empty text); "
                "use --strict-data to make them fatal"
            )

    def next_document(self) -> Document | None:
        """The next document, moving to the next file and the next epoch as needed; None at
        the end of the first epoch when not cycling."""
        while not self.exhausted:
            path = self.files[self.file_index]
            if self._reader is None:
                self._reader = open_reader(path, self.position)
            item = next(self._reader, StopIteration)
            if item is StopIteration:
                self._reader = None
                self._finish_file(path)
                self.file_index, self.position, self.line = self.file_index + 1, 0, 0
                if self.file_index == len(self.files):
                    if self._docs_this_epoch == 0:
                        raise UserError(f"--task-name {self.name}: no usable documents in it")
                    if not self.cycle:
                        self.exhausted = True
                        return None
                    self.epoch, self.file_index, self._docs_this_epoch = self.epoch + 1, 0, 0
                    logger.info(f"task {self.name}: read through; starting pass {self.epoch + 1}")
                continue
            record, self.position = item
            self.line += 1
            if record is BLANK:
                continue
            doc = record if isinstance(record, Invalid) else self.parse(record)
            if isinstance(doc, str):
                self._malformed(path, doc)
                continue
            self._docs_this_epoch += 1
            return doc
        return None


class HubSource:
    """A hub dataset streamed with `datasets` (split `train`), cycled; the state is a count."""

    def __init__(self, entry: TaskEntry, strict: bool = False, cycle: bool = True) -> None:
        self.name = entry.name
        self.strict = strict
        self.cycle = cycle
        self.exhausted = False
        self.epoch, self.position = 0, 0
        self._iter: Iterator[dict] | None = None
        self._docs_this_epoch = 0
        self.malformed: dict[str, int] = {}
        self.parse = parse_record

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "docs_this_epoch": self._docs_this_epoch,
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._docs_this_epoch = int(state["docs_this_epoch"])
        self.exhausted = bool(state.get("exhausted", False))
        self._iter = None

    def _open(self) -> Iterator[dict]:
        from openchatkit.data.download import hub_error_message, hub_is_offline

        if hub_is_offline():
            raise UserError(
                f"--task-name {self.name}: cannot stream a hub dataset while HF_HUB_OFFLINE=1 "
                "(download it and pass the local files instead)"
            )
        import datasets

        try:
            ds = datasets.load_dataset(self.name, split="train", streaming=True)
            return iter(ds.skip(self.position) if self.position else ds)
        except Exception as err:  # datasets raises many types; all mean "cannot stream it"
            raise UserError(
                f"--task-name {self.name}: not a local file or folder, and streaming it from the "
                f"hub failed: {hub_error_message(err)}"
            ) from None

    def next_document(self) -> Document | None:
        from openchatkit.data.download import hub_error_message

        while not self.exhausted:
            if self._iter is None:
                self._iter = self._open()
            try:
                record = next(self._iter, None)
            except Exception as err:  # a dropped connection mid-stream, an unreadable shard
                raise UserError(
                    f"--task-name {self.name}: streaming from the hub failed after "
                    f"{self.position} records: {hub_error_message(err)}"
                ) from None
            if record is None:
                if self._docs_this_epoch == 0:
                    raise UserError(f"--task-name {self.name}: no usable documents in it")
                if not self.cycle:
                    self.exhausted = True
                    return None
                self.epoch, self.position, self._docs_this_epoch = self.epoch + 1, 0, 0
                self._iter = None
                continue
            self.position += 1
            doc = self.parse(record)
            if isinstance(doc, str):
                if self.strict:
                    raise UserError(f"{self.name} record {self.position}: {doc} (--strict-data)")
                if self.epoch == 0:
                    self.malformed[self.name] = self.malformed.get(self.name, 0) + 1
                continue
            self._docs_this_epoch += 1
            return doc
        return None


def make_source(
    entry: TaskEntry, strict: bool = False, cycle: bool = True
) -> FileSource | HubSource:
    """The source for one task entry (the records as they are; see data.moderation for the
    packer of `:moderation` entries)."""
    cls = HubSource if entry.kind == "hub" else FileSource
    return cls(entry, strict, cycle)
