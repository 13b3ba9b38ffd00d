"""The layer-sharded model format: one safetensors file per transformer layer.

A folder holds `config.json`, the tokenizer files, `generation_config.json` if any,
`embeddings.safetensors`, `layer_00000.safetensors` ... (global layer index), `head.safetensors`
(final norm + LM head; no LM head tensor when embeddings are tied) and `manifest.json`:

    {"format": "openchatkit-layer-sharded", "version": 1, "architecture": "llama",
     "num_layers": 30, "dtype": "float32", "tie_word_embeddings": true, ...}

A pipeline stage reads only the files of its layers, so loading memory and time scale with the
stage, not the model. A trainer checkpoint (`checkpoint_<step>/`) is the same folder plus
optimizer state and `meta.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError
from openchatkit.fileio import write_json

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions that make tensors: reading and checking a folder's
# layout (a converter's refusal of a bad --ckpt-path) then runs without it.

FORMAT = "openchatkit-layer-sharded"
VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
HEAD_FILE = "head.safetensors"
# Everything a tokenizer or generation setup may need, copied along with the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the dtypes a folder may hold (torch names)
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def layer_file(index: int) -> str:
    """File name of the global layer `index`."""
    return f"layer_{index:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}")
    return name


def check_dtype_name(name: str) -> str:
    """`fp16`, `float16`, `torch.float16` ... -> its name in DTYPE_NAMES (no torch needed);
    UserError for any other."""
    key = str(name).removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {name!r}: use one of float32, float16, bfloat16")
    return key


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """`fp16`, `float16`, `torch.float16` ... -> torch dtype; None stays None."""
    if name is None:
        return None
    import torch

    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, check_dtype_name(name))


@dataclass
class Manifest:
    """The contents of `manifest.json`; unknown extra fields are kept in `extra`."""

    architecture: str
    num_layers: int
    dtype: str
    tie_word_embeddings: bool
    chat_format: str | None = None  # "openchatkit" when fine-tuned on <human>/<bot> turns
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION}
        out.update({k: v for k, v in asdict(self).items() if k != "extra"})
        if out["chat_format"] is None:
            del out["chat_format"]
        out.update(self.extra)
        return out


def is_sharded_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check `manifest.json`; UserError naming the file on anything wrong."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a layer-sharded model folder (no {MANIFEST})") from None
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise UserError(f"cannot read {path}: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an {FORMAT} manifest")
    if data.get("version") != VERSION:
        raise UserError(f"{path}: format version {data.get('version')} (this code reads {VERSION})")
    known = {"architecture", "num_layers", "dtype", "tie_word_embeddings", "chat_format"}
    try:
        manifest = Manifest(
            architecture=str(data["architecture"]),
            num_layers=int(data["num_layers"]),
            dtype=str(data["dtype"]),
            tie_word_embeddings=bool(data["tie_word_embeddings"]),
            chat_format=data.get("chat_format"),
            extra={k: v for k, v in data.items() if k not in known | {"format", "version"}},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: missing or bad field {err}") from None
    check_dtype_name(manifest.dtype)
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    write_json(Path(folder) / MANIFEST, manifest.to_json())


def part_files(num_layers: int, layer_range: range | None = None, first=True, last=True) -> list:
    """The weight files of a stage (all of them by default), in load order."""
    layers = range(num_layers) if layer_range is None else layer_range
    files = [EMBEDDINGS_FILE] if first else []
    files += [layer_file(i) for i in layers]
    return files + ([HEAD_FILE] if last else [])


def check_files(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Every weight file is present and has a readable safetensors header."""
    from safetensors import safe_open

    for name in part_files(manifest.num_layers):
        path = Path(folder) / name
        if not path.is_file():
            raise UserError(f"missing weight file {path}")
        try:
            # numpy, not pt: the header check alone, without importing torch (same errors)
            with safe_open(str(path), framework="numpy") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise UserError(f"unreadable weight file {path} (truncated?): {err}") from None


def load_tensors(
    path: str | os.PathLike,
    keys: list[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `keys`) from one safetensors file; UserError naming the file if it
    is missing, truncated or lacks a key."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing weight file {path}")
    target = torch.device("cpu" if device is None else device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())  # safetensors wants an index
    target = str(target)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=target) as f:
            names = list(f.keys()) if keys is None else keys
            for name in names:
                if name not in f.keys():
                    raise UserError(f"{path} lacks tensor {name!r}")
                tensor = f.get_tensor(name)
                out[name] = tensor if dtype is None else tensor.to(dtype)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"unreadable weight file {path} (truncated?): {err}") from None
    return out


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors file atomically (temp name beside it, then rename), streaming the
    tensors so no second copy of them is made."""
    import tempfile

    from openchatkit.models.hf_weights import write_safetensors

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        specs = [(k, v.dtype, list(v.shape)) for k, v in tensors.items()]
        write_safetensors(tmp, specs, iter(tensors.values()))
        make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_readable(path: Path) -> None:
    """Give a temp file or folder (created 0600/0700) the permissions the umask allows."""
    from openchatkit.fileio import apply_umask

    apply_umask(path)


def copy_tokenizer_files(src: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation-config files `src` has into `dest`; returns their names."""
    from openchatkit.models.hf_weights import contained_file

    copied = []
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            # A symlink out of the source folder (to a key, say) is refused, not copied.
            shutil.copyfile(contained_file(src, name), Path(dest) / name)
            copied.append(name)
    return copied
