"""`--profiling tidy_profiling`: a small Chrome trace per rank with the spans that matter.

torch.profiler records a few steps; its trace is then reduced to forward, backward, send,
receive, all-reduce and optimizer spans (the pipeline schedule's `Forward i` / `Backward i`
regions, the c10d communication ops, and the engine's named regions), renamed into those
categories, and written as `<checkpoint-path>/profiles/trace_rank<R>.json` (open in
chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from openchatkit.fileio import write_json

# (category, pattern on the profiler event name); the first match wins.
CATEGORIES = [
    ("forward", re.compile(r"^forward", re.I)),
    ("backward", re.compile(r"^backward", re.I)),
    ("all-reduce", re.compile(r"all_?reduce", re.I)),
    ("optimizer", re.compile(r"^optimizer$|^Optimizer\.step", re.I)),
    ("send", re.compile(r"send", re.I)),
    ("recv", re.compile(r"recv", re.I)),
]


def categorize(name: str) -> str | None:
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return None


def tidy_trace(raw: dict[str, Any], rank: int) -> dict[str, Any]:
    """Keep complete ("X") events of the categories above, with the category as `cat`."""
    events = []
    for ev in raw.get("traceEvents", []):
        if ev.get("ph") != "X":
            continue
        category = categorize(str(ev.get("name", "")))
        if category is None and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            category = "gpu"  # a CUDA kernel or copy on the device's own timeline
        if category is None:
            continue
        events.append(
            {
                "name": ev["name"],
                "cat": category,
                "ph": "X",
                "ts": ev["ts"],
                "dur": ev.get("dur", 0),
                "pid": rank,
                "tid": ev.get("tid", 0),
            }
        )
    events.sort(key=lambda e: e["ts"])
    meta = {"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}}
    return {"traceEvents": [meta, *events], "displayTimeUnit": "ms"}


class StepProfiler:
    """Profiles steps [first, first + count) and then writes the tidy trace once."""

    def __init__(
        self, folder: str | os.PathLike, rank: int, first: int, count: int, cuda: bool = False
    ):
        # On a GPU the CUDA activity is recorded too: kernels and NCCL's own kernels (whose
        # duration is the real communication time; the CPU side only launches them).
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.path = Path(folder) / "profiles" / f"trace_rank{rank}.json"
        self.rank = rank
        self.first, self.last = first, first + count - 1
        self._prof: torch.profiler.profile | None = None
        self.active = False
        self.done = False

    def before_step(self, step: int) -> None:
        if self.done or self._prof is not None or step < self.first:
            return
        self._prof = torch.profiler.profile(activities=self.activities)
        self._prof.__enter__()
        self.active = True

    def after_step(self, step: int, final: bool = False) -> None:
        if self._prof is None or (step < self.last and not final):
            return
        self._prof.__exit__(None, None, None)
        self.active = False
        fd, raw_path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self._prof.export_chrome_trace(raw_path)
            with open(raw_path) as f:
                raw = json.load(f)
        finally:
            os.unlink(raw_path)
        write_json(self.path, tidy_trace(raw, self.rank))
        self._prof = None
        self.done = True
