"""passages.parquet: the text of an index's passages, row-aligned with its vectors.

Columns: text, title, source, position (the passage's place in its source). Read by our own
index folders and by the original's Wikipedia layout (`openchatkit/retrieval/wikipedia.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openchatkit.errors import UserError
from openchatkit.retrieval.corpus import Passage


class PassageTable:
    """Column access to passages.parquet without materialising Python objects for every row."""

    def __init__(self, table: Any) -> None:
        self.table = table.combine_chunks()
        self._text = self.table.column("text")
        self._title = self.table.column("title")
        self._source = self.table.column("source")
        self._position = self.table.column("position")

    def __len__(self) -> int:
        return self.table.num_rows

    def text(self, row: int) -> str:
        return self._text[row].as_py() or ""

    def title(self, row: int) -> str:
        return self._title[row].as_py() or ""

    def source(self, row: int) -> str:
        return self._source[row].as_py() or ""

    def position(self, row: int) -> int:
        return int(self._position[row].as_py())


def write_passages(path: Path, passages: Sequence[Passage]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "text": pa.array([p.text for p in passages], pa.string()),
            "title": pa.array([p.title for p in passages], pa.string()),
            "source": pa.array([p.source for p in passages], pa.string()),
            "position": pa.array([p.position for p in passages], pa.int32()),
        }
    )
    pq.write_table(table, path)


def read_passages(path: Path, columns: dict[str, str] | None = None) -> PassageTable:
    """passages.parquet as a PassageTable; `columns` renames file columns (e.g. text_snippet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path}: unreadable parquet ({str(err).splitlines()[0]})") from err
    if columns:
        table = table.rename_columns([columns.get(n, n) for n in table.column_names])
    if "text" not in table.column_names:
        raise UserError(f"{path}: no 'text' column (has {', '.join(table.column_names)})")
    n = table.num_rows
    defaults = {
        "title": pa.array([""] * n, pa.string()),
        "source": pa.array([path.name] * n, pa.string()),
        # Without positions the rows are one long document in reading order (Wikipedia layout).
        "position": pa.array(np.arange(n, dtype=np.int64)),
    }
    for name, column in defaults.items():
        if name not in table.column_names:
            table = table.append_column(name, column)
    return PassageTable(table)
