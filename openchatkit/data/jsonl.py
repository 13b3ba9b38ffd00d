"""Bounded JSON-lines reading for every jsonl reader of the kit (training data, evaluation data,
chat prompts, corpora, metrics).

Data files come from elsewhere and may be hostile: a line of 100,000 nested brackets makes
`json.loads` raise RecursionError (not a ValueError), and a multi-GB file without a newline
would be read into memory whole by `for line in f`. Here a line is read with
`readline(limit)`: one longer than `max_line_bytes()` is consumed in pieces and reported as
too long, and a line that does not decode is reported as not JSON. Callers skip and count
such lines, or stop on them (`--strict-data`); neither ever ends in a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import IO, Any

# The longest line read (bytes, newline included); OPENCHATKIT_MAX_LINE_BYTES overrides it.
# 64 MiB is far above any real chat record and far below what would strain memory.
DEFAULT_MAX_LINE_BYTES = 64 << 20
_SKIP_PIECE = 1 << 20  # bytes read at a time while skipping an over-long line


def max_line_bytes() -> int:
    """The line-length cap in bytes (OPENCHATKIT_MAX_LINE_BYTES, else 64 MiB)."""
    try:
        return max(1, int(os.environ.get("OPENCHATKIT_MAX_LINE_BYTES", DEFAULT_MAX_LINE_BYTES)))
    except ValueError:
        return DEFAULT_MAX_LINE_BYTES


class Invalid(str):
    """A reader's mark for a line that is not a JSON value (a JSON string literal stays a plain
    str); its text is the reason."""


NOT_JSON = Invalid("not valid JSON")


def too_long(limit: int) -> Invalid:
    return Invalid(f"line longer than {limit} bytes (OPENCHATKIT_MAX_LINE_BYTES)")


def read_lines(f: IO[bytes], limit: int | None = None) -> Iterator[tuple[bytes | None, int]]:
    """(line, bytes consumed) for each line of binary file `f`; the line is None when it is
    longer than `limit` bytes (it is then consumed up to its newline without being kept)."""
    limit = max_line_bytes() if limit is None else limit
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        consumed = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(_SKIP_PIECE)
            if not raw:
                break
            consumed += len(raw)
        yield None, consumed


def parse_line(raw: bytes | str) -> Any:
    """The JSON value of one line, or NOT_JSON for anything `json.loads` refuses, nesting too
    deep for the parser included."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return NOT_JSON


def iter_json_lines(f: IO[bytes], limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """(1-based line number, value or an `Invalid` reason) for each non-blank line of `f`."""
    limit = max_line_bytes() if limit is None else limit
    for number, (raw, _) in enumerate(read_lines(f, limit), start=1):
        if raw is None:
            yield number, too_long(limit)
        elif raw.strip():
            yield number, parse_line(raw)
