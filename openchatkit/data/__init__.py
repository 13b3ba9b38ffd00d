"""Chat data: task specs, document sources, weighted mixing, tokenization and packing, and the
hub downloads behind the `data/*/prepare.py` scripts.

Public API: `parse_task_spec`, `TaskEntry`, `PackedSequenceStream`, `GlobalBatchLoader`.
Importing this package is cheap and has no side effects (torch is imported by `packing` only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openchatkit.data.tasks import TaskEntry, parse_task_spec

if TYPE_CHECKING:
    from openchatkit.data.packing import GlobalBatchLoader, PackedSequenceStream

__all__ = ["GlobalBatchLoader", "PackedSequenceStream", "TaskEntry", "parse_task_spec"]


def __getattr__(name: str):
    # Lazy: `from openchatkit.data import PackedSequenceStream` imports torch only when used.
    if name in ("PackedSequenceStream", "GlobalBatchLoader", "IGNORE_INDEX"):
        from openchatkit.data import packing

        return getattr(packing, name)
    raise AttributeError(name)
