"""The one list of supported architectures: our names, their HF `model_type`, and where each
architecture's module lives.

Everything that needs to know which architectures exist asks here: the converters, the trainer's
flags, the stage builder, the memory planner and the benchmarks. Nothing here, nor in the
architecture modules, imports torch or transformers modeling code at import time, so a script
can refuse a wrong architecture within a second; `get_architecture` imports only the module it
returns, and what the rest of the kit must know about an architecture (LoRA targets, tie
default, parameter counts, activation bytes) is an attribute of the `Architecture` it returns. A new architecture is one module of the shape described in
`openchatkit/models/arch.py` and one line in `ARCHITECTURES`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from openchatkit.errors import UserError

if TYPE_CHECKING:
    from openchatkit.models.arch import Architecture

# Our name (converter script suffix, --model-type) -> (HF config.model_type, module).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "gptneox": ("gpt_neox", "openchatkit.models.gptneox"),
    "gptj": ("gptj", "openchatkit.models.gptj"),
    "llama": ("llama", "openchatkit.models.llama"),
    "qwen2": ("qwen2", "openchatkit.models.qwen2"),
    "mistral": ("mistral", "openchatkit.models.mistral"),
}
# Our name -> HF model_type.
MODEL_TYPES: dict[str, str] = {name: mt for name, (mt, _) in ARCHITECTURES.items()}
TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"  # the checkout's converter scripts


def architecture_names() -> list[str]:
    """Our names of the supported architectures (gptneox, gptj, llama, ...)."""
    return list(ARCHITECTURES)


def supported_model_types() -> list[str]:
    """HF model types of the supported architectures (gpt_neox, gptj, llama, ...)."""
    return list(MODEL_TYPES.values())


def name_for_model_type(model_type: str) -> str | None:
    """Our name for an HF model_type (`gpt_neox` -> `gptneox`); None if unsupported."""
    for name, mt in MODEL_TYPES.items():
        if mt == model_type:
            return name
    return None


def get_architecture(name_or_model_type: str) -> Architecture:
    """The architecture for our name (`gptneox`) or an HF model type (`gpt_neox`)."""
    name = name_or_model_type
    if name not in ARCHITECTURES:
        name = name_for_model_type(name_or_model_type)
    if name is None:
        raise UserError(
            f"unsupported architecture {name_or_model_type!r}: supported are "
            f"{', '.join(supported_model_types())}"
        )
    return importlib.import_module(ARCHITECTURES[name][1]).ARCHITECTURE


def read_model_type(folder: str | Path) -> str:
    """`model_type` from a folder's config.json, read as plain JSON (no transformers import)."""
    path = Path(folder) / "config.json"
    try:
        return str(json.loads(path.read_text())["model_type"])
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json (not an HF model folder)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read model_type from {path}: {err}") from None


def converter_script(direction: str, arch: str | None = None) -> str:
    """The script a hint names to convert `direction` ("to_hf" or "from_hf"): the generic
    `tools/convert_<direction>.py`, which reads the architecture itself, or for an architecture
    that has one the upstream per-architecture alias (`tools/convert_to_hf_llama.py`), so a hint
    reads like the OpenChatKit recipes. Which aliases exist is read from the checkout, not
    listed: this registry is the one list of architectures."""
    if arch in ARCHITECTURES and (TOOLS_DIR / f"convert_{direction}_{arch}.py").is_file():
        return f"tools/convert_{direction}_{arch}.py"
    return f"tools/convert_{direction}.py"
