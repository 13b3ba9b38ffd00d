"""Reading HF checkpoint weights one tensor at a time, and writing HF safetensors shards.

HF folders hold `model.safetensors`, or shards listed in `model.safetensors.index.json`, or (older
models such as GPT-J-6B and RedPajama-INCITE) `pytorch_model*.bin`. Safetensors shards are read
with `safe_open`, which maps the file and copies out only the tensor asked for; `.bin` shards are
loaded with `mmap=True`. Either way memory holds about one layer, not the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from openchatkit.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Shard size when writing HF folders; transformers' own default.
MAX_SHARD_BYTES = 5 * 1024**3


class HFWeights:
    """Tensor-by-tensor access to an HF folder's weights: `keys()`, `get(key)`, `shape(key)`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        files = self._weight_files()
        for path in files:
            for key in self._open(path).keys():
                self._file_of[key] = path

    def _weight_files(self) -> list[Path]:
        folder = self.folder
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index = folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError) as err:
                    raise UserError(f"cannot read {index}: {err}") from None
                files = sorted({folder / name for name in weight_map.values()})
                for path in files:
                    if not path.is_file():
                        raise UserError(f"missing weight file {path} (listed in {index.name})")
                return files
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                return [folder / name]
        raise UserError(f"{folder} holds no HF weights (model.safetensors or pytorch_model.bin)")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._handles[path] = safe_open(str(path), framework="pt")
                else:
                    self._handles[path] = _BinShard(path)
            except Exception as err:
                raise UserError(f"unreadable weight file {path} (truncated?): {err}") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, key: str) -> torch.Tensor:
        path = self._file_of[key]
        try:
            return self._open(path).get_tensor(key)
        except Exception as err:
            raise UserError(f"cannot read {key!r} from {path} (truncated?): {err}") from None


class _BinShard:
    """A pickled `.bin` shard, memory-mapped so tensors are paged in on use."""

    def __init__(self, path: Path):
        self.state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def keys(self):
        return self.state.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Group keys (in order) into shards of at most `max_bytes` (a single larger tensor gets a
    shard of its own)."""
    shards: list[list[str]] = [[]]
    total = 0
    for key, nbytes in sizes:
        if shards[-1] and total + nbytes > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(key)
        total += nbytes
    return shards


def shard_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_hf_shards(
    folder: Path,
    shards: list[list[str]],
    produce: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """Write tensors from `produce` (in shard order) into HF safetensors shards and, when there is
    more than one, the index file transformers reads."""
    from safetensors.torch import save_file

    names = shard_names(len(shards))
    weight_map, total = {}, 0
    for name, keys in zip(names, shards, strict=True):
        tensors = {}
        for key in keys:
            got_key, tensor = next(produce)
            if got_key != key:
                raise RuntimeError(f"shard plan out of order: {got_key} != {key}")
            tensors[key] = tensor.contiguous()
            total += tensor.numel() * tensor.element_size()
            weight_map[key] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
