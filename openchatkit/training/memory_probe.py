"""Count the bytes a piece of PyTorch code really keeps alive, on any device (CPU included).

`LiveBytes` is a `TorchDispatchMode`: every tensor an op returns is recorded by its storage,
and a weak-reference finalizer takes it off the count when the storage is freed. So `live` is
the bytes allocated under the mode and still referenced (saved for backward, held by a schedule,
returned), and `peak` the most at any time: an allocator count that works without CUDA. Storages
that existed before (parameters, inputs) are passed as `exclude` and never counted; views do not
allocate and are not counted twice.

It is how the memory planner (`openchatkit/training/memory.py`) was calibrated and how the
tests check it against tiny models of each architecture.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """`with LiveBytes(exclude=model_tensors) as probe: ...`; then `probe.live`, `probe.peak`."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._known = {t.untyped_storage()._cdata for t in exclude}
        self._sizes: dict[int, int] = {}  # storage id -> bytes, while alive
        self.live = 0
        self.peak = 0

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes or key in self._known:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.live -= size

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out
