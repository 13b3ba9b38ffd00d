"""Giving modules a faster forward in place: their class becomes a subclass that overrides one
method, so parameters, buffers, hooks and state-dict keys stay exactly as they were."""

from __future__ import annotations

from torch import nn


def swap_class(root: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> int:
    """Turn every module under `root` whose type is exactly `old` into a `new` (a subclass of
    `old` adding no state); returns how many."""
    swapped = 0
    for sub in root.modules():
        if type(sub) is old:
            sub.__class__ = new
            swapped += 1
    return swapped
