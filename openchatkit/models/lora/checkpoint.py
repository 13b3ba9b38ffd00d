"""The LoRA trainer checkpoint: what the trainer writes beside optimizer/ and rng/ in
`checkpoint_<step>/`, how it is read back, and what a resume must match.

Files:
    adapter_stage_<pp rank>.safetensors   this stage's adapter tensors (global names, so any
                                          pipeline layout reads any other's)
    adapter.json                          LoRA settings, base model path and fingerprint

Used by the trainer (save, resume, `check_lora_resume`), the converters (`merge.py`), the loader
of any MODEL (`models/any_model.py`) and `tools/export_lora.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError
from openchatkit.models.lora.adapters import LoraSettings, adapter_state, is_adapter_param

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_META = "adapter.json"


def save_adapter_stage(stage: nn.Module, folder: Path, pp_rank: int, bias: str) -> None:
    from openchatkit.models import sharded

    sharded.save_tensors(
        folder / f"adapter_stage_{pp_rank}.safetensors", adapter_state(stage, bias)
    )


def load_adapter_into(stage: nn.Module, folder: Path, bias: str = "none") -> None:
    """Copy the saved adapter tensors of this stage's parameters (from any stage file: the
    checkpoint may come from another layout) into the stage."""
    import torch
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    files = sorted(Path(folder).glob("adapter_stage_*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no adapter_stage_*.safetensors (not a LoRA checkpoint)")
    for path in files:
        try:
            saved.update(load_file(path))
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    used: set[str] = set()
    with torch.no_grad():
        for name, param in stage.named_parameters():
            if not is_adapter_param(name, bias):
                continue
            if name not in saved:
                raise UserError(f"{folder}: the checkpoint has no adapter tensor {name!r}")
            param.copy_(saved[name].to(param.dtype))
            used.add(name)
    # An adapter the model has no place for would be dropped without a word.
    # Only this stage's layers count: the other stages' files are read too.
    layers = {f"layers.{key}." for key in getattr(stage, "layers", {})}
    unused = sorted(
        n for n in saved if ".lora_" in n and n not in used and any(n.startswith(p) for p in layers)
    )
    if unused:
        raise UserError(
            f"{folder}: {len(unused)} adapter tensor(s) have no place in the model, e.g. "
            f"{unused[0]!r} (other --lora-target-modules?)"
        )


def base_fingerprint(folder: str | os.PathLike) -> str:
    """A content fingerprint of a layer-sharded base model that costs milliseconds even at 40 GB:
    sha256 over manifest.json, config.json, and each weight file's name, size and first and
    last MiB. Two different bases (or a re-prepared one in another dtype) differ."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("manifest.json", "config.json"):
        path = folder / name
        h.update(path.read_bytes() if path.is_file() else b"-")
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def adapter_meta(settings: LoraSettings, base: str | os.PathLike) -> dict[str, Any]:
    return {
        "format": "openchatkit-lora",
        "lora": asdict(settings),
        "base_model": str(base),
        # Where `base_model` pointed when training (it may be relative to the trainer's working
        # directory); the evaluator falls back to it when run from elsewhere.
        "base_model_abs": str(Path(base).resolve()),
        "base_fingerprint": base_fingerprint(base),
    }


def locate_base(meta: dict[str, Any], what: str) -> Path:
    """The base model folder a LoRA checkpoint's adapter.json names, checked as the trainer's
    resume checks it: the folder exists and its content fingerprint is the one trained on.
    `what` names the user's flag and value in the one-line errors."""
    named = str(meta.get("base_model", ""))
    candidates = [Path(str(p)).expanduser() for p in (named, meta.get("base_model_abs")) if p]
    base = next((p for p in candidates if p.is_dir()), None)
    if base is None:
        raise UserError(
            f"{what}: its base model {named} (recorded by the trainer) does not exist; put the "
            "base back at that path"
        )
    found = base_fingerprint(base)
    if found != meta.get("base_fingerprint"):
        raise UserError(
            f"{what}: its adapters were trained on {named} (fingerprint "
            f"{meta.get('base_fingerprint')}), but {base} now holds another model (fingerprint "
            f"{found})"
        )
    return base


def read_adapter_meta(folder: str | os.PathLike) -> dict[str, Any] | None:
    """adapter.json of a checkpoint folder, or None for a full-weight checkpoint."""
    path = Path(folder) / ADAPTER_META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None


def settings_from_meta(meta: dict[str, Any]) -> LoraSettings:
    lora = dict(meta["lora"])
    lora["target_modules"] = tuple(lora["target_modules"])
    return LoraSettings(**lora)


def read_adapter_checkpoint(
    ckpt: str | os.PathLike,
) -> tuple[Path, dict[str, Any], LoraSettings, dict[str, torch.Tensor]]:
    """A LoRA trainer checkpoint (a `checkpoint_<step>/` or the folder holding `latest`):
    (folder, adapter.json, settings, every adapter tensor by our name)."""
    from openchatkit.models.convert import resolve_checkpoint

    folder = resolve_checkpoint(ckpt)
    meta = read_adapter_meta(folder)
    if meta is None:
        raise UserError(f"--ckpt-path {ckpt}: not a LoRA checkpoint (no {ADAPTER_META})")
    # Imported after the checks above: a wrong --ckpt-path is refused without torch.
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("adapter_stage_*.safetensors")):
        try:
            tensors.update(load_file(path))
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    if not tensors:
        raise UserError(f"--ckpt-path {folder}: no adapter_stage_*.safetensors")
    return folder, meta, settings_from_meta(meta), tensors


def save_adapter_checkpoint(
    stage: nn.Module,
    folder: Path,
    pp_rank: int,
    settings: LoraSettings,
    base: str | os.PathLike,
    tokenizer: str | os.PathLike,
) -> None:
    """A LoRA checkpoint's model part: this stage's adapters; stage 0 adds adapter.json (the
    settings, the base model and its fingerprint) and the tokenizer files."""
    from openchatkit.fileio import write_json
    from openchatkit.models import sharded

    save_adapter_stage(stage, folder, pp_rank, settings.bias)
    if pp_rank == 0:
        write_json(folder / ADAPTER_META, adapter_meta(settings, base))
        sharded.copy_tokenizer_files(tokenizer, folder)


def check_lora_resume(
    folder: Path, settings: LoraSettings | None, base: str | os.PathLike, flag: str
) -> None:
    """Refuse to resume a LoRA run (`settings`) from full weights or the other way round
    (`settings` None), with other LoRA settings, or from adapters trained on another `base`
    (one line; `flag` names the checkpoint flag and its value)."""
    meta = read_adapter_meta(folder)
    if settings is None and meta is not None:
        raise UserError(
            f"{flag}: {folder.name} holds LoRA adapters; "
            "resume with the same --lora-r, or use a new --checkpoint-path for full fine-tuning"
        )
    if settings is not None and meta is None:
        raise UserError(
            f"{flag}: {folder.name} holds full weights, not "
            "LoRA adapters; use a new --checkpoint-path for a LoRA run"
        )
    if meta is None or settings is None:
        return
    # The adapter's shape and function: r, alpha, targets, bias. Dropout only acts in
    # training, like the learning rate, and may change on resume.
    saved = meta.get("lora", {})
    now = asdict(settings)
    changed = [
        f"{key} {_setting_text(saved.get(key))} -> {_setting_text(now[key])}"
        for key in ("r", "alpha", "target_modules", "bias")
        if _setting_text(saved.get(key)) != _setting_text(now[key])
    ]
    if changed:
        raise UserError(
            f"{flag}: {folder.name} holds adapters with "
            f"other LoRA settings ({'; '.join(changed)}); resume with the same --lora-* "
            "flags or use a new --checkpoint-path"
        )
    if meta["base_fingerprint"] != base_fingerprint(base):
        raise UserError(
            f"{flag}: its adapters were trained on "
            f"{meta['base_model']} (fingerprint {meta['base_fingerprint']}), not on "
            f"--model-name {base}; give that base or a new --checkpoint-path"
        )


def _setting_text(value: Any) -> str:
    """A LoRA setting as comparable text: target lists in any order, alpha 32 == 32.0."""
    if isinstance(value, (list, tuple)):
        return ",".join(sorted(map(str, value)))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):g}"
    return str(value)
