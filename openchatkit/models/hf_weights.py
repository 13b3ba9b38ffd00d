"""Reading HF checkpoint weights one tensor at a time, and writing HF safetensors shards.

HF folders hold `model.safetensors`, or shards listed in `model.safetensors.index.json`, or (older
models such as GPT-J-6B and RedPajama-INCITE) `pytorch_model*.bin`. Safetensors shards are read
with `safe_open`, which maps the file and copies out only the tensor asked for; `.bin` shards are
loaded with `mmap=True`. Either way memory holds about one layer, not the model.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from openchatkit.errors import UserError

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions that make tensors: checking a file's header (a
# converter's or the bot's refusal of a truncated weight file) then runs without it.

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Shard size when writing HF folders; transformers' own default.
MAX_SHARD_BYTES = 5 * 1024**3
# The longest safetensors header read: the reference library's own cap (MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


def allowed_roots(folder: Path) -> list[Path]:
    """Where the files of model folder `folder` may really be: inside it, or, for a snapshot of
    the HF cache (`models--org--name/snapshots/<rev>/`, whose files link to `../../blobs/`),
    inside that cache repo."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent)
    return roots


def contained_file(folder: str | os.PathLike, name: str, what: str = "model folder") -> Path:
    """`folder / name`, refused (UserError) when the name is absolute or has `..`, or when it
    is a symlink leading outside the folder (or its HF cache repo): a hostile model folder must
    not make the kit read or copy a file from elsewhere (a key, another user's data)."""
    folder = Path(folder)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise UserError(f"{what} {folder}: refusing file name {name!r} (outside the folder)")
    path = folder / name
    real = path.resolve()
    if not any(real == root or root in real.parents for root in allowed_roots(folder)):
        raise UserError(f"{what} {folder}: {name} links outside the folder (to {real}); refused")
    return path


# safetensors dtype codes -> torch dtype names (attributes of torch).
SAFETENSORS_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@functools.cache
def safetensors_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype codes -> torch dtypes."""
    import torch

    return {code: getattr(torch, name) for code, name in SAFETENSORS_DTYPE_NAMES.items()}


class SafetensorsFile:
    """A safetensors file read with plain `read` calls rather than a memory map, so a converted
    tensor's pages leave the process once it is written (a map keeps every touched page of a
    20B model resident). Checks that the data the header describes is all there."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"unreadable weight file {self.path} (truncated: no header)")
            header_len = int.from_bytes(head, "little")
            if header_len > MAX_HEADER_BYTES:
                raise UserError(
                    f"unreadable weight file {self.path} (header of {header_len} bytes, over the "
                    f"{MAX_HEADER_BYTES} the safetensors format allows)"
                )
            if header_len > size - 8:
                raise UserError(f"unreadable weight file {self.path} (truncated header)")
            try:
                header = json.loads(f.read(header_len))
            except (ValueError, RecursionError):
                raise UserError(f"unreadable weight file {self.path} (bad header)") from None
        if not isinstance(header, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            for k, v in header.items()
            if k != "__metadata__"
        ):
            raise UserError(f"unreadable weight file {self.path} (bad header)")
        header.pop("__metadata__", None)
        self._base = 8 + header_len
        self._header = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self._base + end > size:
            raise UserError(
                f"unreadable weight file {self.path} (truncated: {size} bytes, header needs "
                f"{self._base + end})"
            )

    def keys(self) -> list[str]:
        return list(self._header)

    def dtype(self, key: str) -> torch.dtype:
        code = self._header[key]["dtype"]
        if code not in SAFETENSORS_DTYPE_NAMES:
            raise UserError(f"{self.path}: tensor {key!r} has unsupported dtype {code}")
        return safetensors_dtypes()[code]

    def shape(self, key: str) -> list[int]:
        return list(self._header[key]["shape"])

    def nbytes(self, key: str) -> int:
        start, stop = self._header[key]["data_offsets"]
        return stop - start

    def get_tensor(self, key: str) -> torch.Tensor:
        import torch

        info = self._header[key]
        start, stop = info["data_offsets"]
        buf = bytearray(stop - start)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(buf) != len(buf):
                raise UserError(f"unreadable weight file {self.path} (truncated at {key!r})")
        dtype = self.dtype(key)
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


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
                    names = {str(name) for name in weight_map.values()}
                except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
                    raise UserError(f"cannot read {index}: {type(err).__name__}: {err}") from None
                # Names from a downloaded index: never a path outside the folder.
                files = sorted(contained_file(folder, name) for name in names)
                for path in files:
                    if not path.is_file():
                        raise UserError(f"missing weight file {path} (listed in {index.name})")
                return files
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                return [contained_file(folder, name)]
        raise UserError(f"{folder} holds no HF weights (model.safetensors or pytorch_model.bin)")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                if path.suffix == ".safetensors":
                    self._handles[path] = SafetensorsFile(path)
                else:
                    self._handles[path] = _BinShard(path)
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"unreadable weight file {path} (truncated?): {err}") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def dtype(self, key: str) -> torch.dtype:
        handle = self._open(self._file_of[key])
        return (
            handle.dtype(key)
            if isinstance(handle, SafetensorsFile)
            else handle.get_tensor(key).dtype
        )

    def get(self, key: str) -> torch.Tensor:
        path = self._file_of[key]
        try:
            return self._open(path).get_tensor(key)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"cannot read {key!r} from {path} (truncated?): {err}") from None


class _BinShard:
    """A pickled `.bin` shard, memory-mapped so tensors are paged in on use."""

    def __init__(self, path: Path):
        import torch

        self.state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def keys(self):
        return self.state.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


def plan_shards(
    specs: list[tuple[str, torch.dtype, list[int]]], max_bytes: int = MAX_SHARD_BYTES
) -> list[list[tuple[str, torch.dtype, list[int]]]]:
    """Group (key, dtype, shape) specs, in order, into shards of at most `max_bytes` (a single
    larger tensor gets a shard of its own)."""
    shards: list[list] = [[]]
    total = 0
    for spec in specs:
        nbytes = spec[1].itemsize
        for dim in spec[2]:
            nbytes *= dim
        if shards[-1] and total + nbytes > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(spec)
        total += nbytes
    return shards


def shard_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_safetensors(
    path: str | os.PathLike,
    specs: list[tuple[str, torch.dtype, list[int]]],
    tensors: Iterator[torch.Tensor],
) -> None:
    """Write a safetensors file tensor by tensor: the header from `specs` (key, dtype, shape)
    first, then each tensor `tensors` yields, in the same order. Memory holds one tensor, where
    `safetensors.torch.save_file` holds a byte copy of them all."""
    import torch

    codes = {v: k for k, v in safetensors_dtypes().items()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in specs:
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * dtype.itemsize
        header[key] = {
            "dtype": codes[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (key, dtype, shape), tensor in zip(specs, tensors, strict=True):
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(
                    f"{key}: got {tensor.dtype} {list(tensor.shape)}, planned {dtype} {shape}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(data.numpy().data)
        # On disk before anyone renames it into place (a checkpoint's weights are the files
        # retention relies on after a power cut).
        f.flush()
        os.fsync(f.fileno())


def write_hf_shards(
    folder: Path,
    shards: list[list[tuple[str, torch.dtype, list[int]]]],
    produce: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """Write tensors from `produce` (in shard order) into HF safetensors shards and, when there is
    more than one, the index file transformers reads."""
    names = shard_names(len(shards))
    weight_map, total = {}, 0

    def tensors_of(specs):
        for key, _, _ in specs:
            got_key, tensor = next(produce)
            if got_key != key:
                raise RuntimeError(f"shard plan out of order: {got_key} != {key}")
            yield tensor

    for name, specs in zip(names, shards, strict=True):
        write_safetensors(folder / name, specs, tensors_of(specs))
        for key, dtype, shape in specs:
            weight_map[key] = name
            numel = 1
            for dim in shape:
                numel *= dim
            total += numel * dtype.itemsize
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
