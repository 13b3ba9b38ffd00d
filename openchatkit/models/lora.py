"""LoRA adapters on pipeline stages, in PEFT's format: inject, save, load, export, fingerprint.

`peft` makes the adapters: its `LoraConfig` and `inject_adapter_in_model` on each stage's
modules (the base weights are frozen, only `lora_A` / `lora_B` (and biases with `--lora-bias`)
train). Our adapter tensors keep the stage's global parameter names
(`layers.<i>.self_attn.q_proj.lora_A.default.weight`), so a checkpoint saved under one pipeline
layout loads under another; `export_peft` renames them to the keys `PeftModel.from_pretrained`
reads on the HF model (`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`),
through the architecture's own key map.

Importing this module is cheap (torch and peft load on first use), so the trainer's flag checks
can build `LoraSettings`.

Checkpoint files (beside optimizer/ and rng/ in `checkpoint_<step>/`):
    adapter_stage_<pp rank>.safetensors   this stage's adapter tensors
    adapter.json                          LoRA settings, base model path and fingerprint
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_META = "adapter.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# Beside an exported adapter: evenly spaced values of one adapted base weight, so that loading
# the adapter on another base of the same shapes is refused rather than silently wrong.
BASE_SAMPLE = "openchatkit_base.json"
SAMPLE_N = 256
ADAPTER_NAME = "default"  # peft's name for the one adapter


def _quiet_bitsandbytes() -> None:
    """peft imports bitsandbytes, whose CPU backend logs a warning about an optional kernels
    package at import; it is noise for LoRA (no 4-bit kernels are used on CPU)."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclass(frozen=True)
class LoraSettings:
    """What `--lora-*` asks for (r > 0)."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    bias: str = "none"  # none | all | lora_only

    def peft_config(self) -> Any:
        _quiet_bitsandbytes()
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias=self.bias,
        )


def linear_module_names(config: Any) -> list[str]:
    """Names of the nn.Linear modules inside one transformer layer of this architecture (what
    `--lora-target-modules` can name), from a layer built on the meta device."""
    import torch
    from torch import nn

    from openchatkit.models.arch import prepare_config
    from openchatkit.models.registry import get_architecture

    arch = get_architecture(config.model_type)
    with torch.device("meta"):
        layer = arch.build_layer(prepare_config(config, arch), 0)
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def check_targets(config: Any, targets: tuple[str, ...]) -> None:
    """UserError naming the layer's linear modules when a target matches none (peft matches a
    target against a module name exactly or as its last dotted part(s))."""
    names = linear_module_names(config)
    for target in targets:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            raise UserError(
                f"--lora-target-modules {target!r} matches no linear module of a "
                f"{config.model_type} layer; its linear modules are: {', '.join(names)}"
            )


def apply_lora(stage: nn.Module, settings: LoraSettings, seed: int = 0) -> None:
    """Inject adapters into the stage's layers in place; everything else is frozen.

    Adapters start as peft starts them (A random, B zero), so the adapted model begins equal to
    the base. Each layer's draws come from a generator seeded by `seed` and the layer's global
    index, so every pipeline layout starts from the same adapters. peft's input dropout becomes
    `LoraDropout` (the same law, ~3x faster on CPU; openchatkit/models/dropout.py)."""
    import torch

    _quiet_bitsandbytes()
    from peft import inject_adapter_in_model

    from openchatkit.models.dropout import use_fast_dropout

    config = settings.peft_config()
    state = torch.random.get_rng_state()
    try:
        for index, layer in stage.layers.items():
            torch.manual_seed(seed * 100_003 + int(index))
            inject_adapter_in_model(config, layer, adapter_name=ADAPTER_NAME)
            use_fast_dropout(layer)
    finally:
        torch.random.set_rng_state(state)
    for name, param in stage.named_parameters():
        param.requires_grad = is_adapter_param(name, settings.bias)


def is_adapter_param(name: str, bias: str = "none") -> bool:
    """Whether a stage parameter trains under LoRA: the adapter matrices, and biases as
    `--lora-bias` says (all: every bias; lora_only: the biases of adapted modules)."""
    if ".lora_" in name:
        return True
    if name.endswith(".bias"):
        return bias == "all" or (bias == "lora_only" and ".base_layer." in name)
    return False


def adapter_state(stage: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The stage's trainable adapter tensors by global name (CPU copies)."""
    return {
        n: p.detach().to("cpu").clone()
        for n, p in stage.named_parameters()
        if is_adapter_param(n, bias)
    }


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


def peft_key(arch: Any, name: str) -> str:
    """Our adapter name -> the key PEFT saves for the HF model, through the key map.

    `layers.3.self_attn.q_proj.lora_A.default.weight` -> the HF weight of the adapted module
    (`model.layers.3.self_attn.q_proj.weight`) minus `.weight`, then `.lora_A.weight`, under
    `base_model.model.`. Biases trained under `--lora-bias` keep the base layer's name, with
    PEFT's `base_layer` infix where the module carries an adapter:
    `layers.3.attention.query_key_value.base_layer.bias` ->
    `base_model.model.gpt_neox.layers.3.attention.query_key_value.base_layer.bias`,
    `head.final_layer_norm.bias` -> `base_model.model.gpt_neox.final_layer_norm.bias`."""
    part, _, rest = name.partition(".")  # "embed" | "layers" | "head", then the part's key
    index = None
    if part == "layers":
        part = "layer"
        index, _, rest = rest.partition(".")  # "3", "self_attn.q_proj.lora_A.default.weight"
    head, _, tail = rest.partition(".lora_")
    if tail:  # an adapter matrix
        matrix, _, param = tail.partition(".")  # "A", "default.weight"
        hf_weight, _ = arch.hf_key(part, f"{head}.weight", index)
        return f"base_model.model.{hf_weight.removesuffix('.weight')}.lora_{matrix}.{param.split('.')[-1]}"
    adapted = ".base_layer." in rest  # a bias of an adapted module (PEFT keeps the infix)
    module, _, param = rest.replace(".base_layer.", ".").rpartition(".")
    hf, _ = arch.hf_key(part, f"{module}.{param}", index)
    if adapted:
        stem, _, last = hf.rpartition(".")
        hf = f"{stem}.base_layer.{last}"
    return f"base_model.model.{hf}"


def _sample(weight: torch.Tensor) -> list[float]:
    import torch

    flat = weight.detach().reshape(-1)
    # Integer arithmetic: float32 linspace rounds past 2**24 elements (a 20B model's qkv).
    index = torch.arange(SAMPLE_N, dtype=torch.int64) * (flat.numel() - 1) // (SAMPLE_N - 1)
    return flat[index].float().tolist()


def base_weight_sample(base: str | os.PathLike, arch: Any, tensors: dict) -> dict | None:
    """The base's weight under the first adapter of the lowest layer (read from the layer-sharded
    base, whose layer files hold the HF layer's own keys) as `BASE_SAMPLE` records it."""
    from safetensors import safe_open

    names = sorted(n for n in tensors if n.startswith("layers.") and ".lora_A" in n)
    if not names:
        return None
    name = min(names, key=lambda n: int(n.split(".")[1]))
    layer, _, rest = name.removeprefix("layers.").partition(".")
    module = rest.split(".lora_A")[0]
    path = Path(base) / f"layer_{int(layer):05d}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor(f"{module}.weight")
    key = peft_key(arch, name).removeprefix("base_model.model.")
    key = key.replace(".lora_A.weight", ".weight")
    dtype = str(weight.dtype).removeprefix("torch.")
    return {"base_model": str(base), "key": key, "dtype": dtype, "values": _sample(weight)}


def check_base_sample(model: Any, folder: Path, what: str) -> None:
    """Refuse an adapter exported from another base: the sampled base weight must match the
    model's within the rounding of the model's dtype (fp32: exact up to 1e-6)."""
    import torch

    path = folder / BASE_SAMPLE
    if not path.is_file():
        return  # an adapter not exported by us: peft's own shape checks only
    try:
        record = json.loads(path.read_text())
        key, want = record["key"], torch.tensor(record["values"], dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{what} {folder}: unreadable {BASE_SAMPLE} ({err})") from None
    try:
        weight = model.get_parameter(key)
    except AttributeError:
        return  # another architecture: peft's key check names it
    if not weight.dtype.is_floating_point or weight.numel() < SAMPLE_N:
        return  # an 8-bit or 4-bit base: no comparable values
    if weight.device.type == "meta":
        return  # offloaded (accelerate's device_map): not in memory to compare
    got = torch.tensor(_sample(weight), dtype=torch.float32)
    # Rounding allowed: that of the coarser of the two dtypes (a bf16-sharded base against the
    # fp16 original loaded in fp32 differs by bf16's rounding, and is the same base).
    eps = {"float32": 1e-6, "bfloat16": 2**-8, "float16": 2**-11}
    model_eps = eps.get(str(weight.dtype).removeprefix("torch."), 2**-8)
    tol = max(model_eps, eps.get(str(record.get("dtype", "float32")), 2**-8)) * want.abs() + 1e-7
    off = int(((got - want).abs() > tol).sum())
    if off > SAMPLE_N // 4:
        base = getattr(model.config, "_name_or_path", "the model")
        raise UserError(
            f"{what} {folder} was exported for {record.get('base_model')}, but {base} holds "
            f"other weights ({off} of {SAMPLE_N} sampled values of {key} differ); give the base "
            "it was trained on"
        )


def export_peft(
    tensors: dict[str, torch.Tensor],
    settings: LoraSettings,
    arch: Any,
    base_name: str,
    out: str | os.PathLike,
    base_sample: dict | None = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` that
    `peft.PeftModel.from_pretrained(hf_base, out)` loads (and `BASE_SAMPLE` when given); the
    folder appears whole."""
    from safetensors.torch import save_file

    from openchatkit.fileio import atomic_dir, write_json

    config = settings.peft_config()
    config.base_model_name_or_path = base_name
    config.task_type = "CAUSAL_LM"
    payload = {peft_key(arch, n): t.contiguous() for n, t in sorted(tensors.items())}
    fields = config.to_dict()
    fields["target_modules"] = sorted(fields["target_modules"])  # a set in peft's dict
    # Callers refuse a non-empty output first (check_output_dir); an old one is replaced only
    # once the new one is complete.
    with atomic_dir(Path(out), overwrite=True) as tmp:
        save_file(payload, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG, fields)
        if base_sample is not None:
            write_json(tmp / BASE_SAMPLE, base_sample)
    return Path(out)


def read_adapter_checkpoint(
    ckpt: str | os.PathLike,
) -> tuple[Path, dict[str, Any], LoraSettings, dict[str, torch.Tensor]]:
    """A LoRA trainer checkpoint (a `checkpoint_<step>/` or the folder holding `latest`):
    (folder, adapter.json, settings, every adapter tensor by our name)."""
    from safetensors.torch import load_file

    from openchatkit.models.convert import resolve_checkpoint

    folder = resolve_checkpoint(ckpt)
    meta = read_adapter_meta(folder)
    if meta is None:
        raise UserError(f"--ckpt-path {ckpt}: not a LoRA checkpoint (no {ADAPTER_META})")
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("adapter_stage_*.safetensors")):
        try:
            tensors.update(load_file(path))
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    if not tensors:
        raise UserError(f"--ckpt-path {folder}: no adapter_stage_*.safetensors")
    return folder, meta, settings_from_meta(meta), tensors


def peft_model_from_tensors(
    model: Any, settings: LoraSettings, tensors: dict[str, torch.Tensor], arch: Any, what: str
) -> Any:
    """A PeftModel of `model` with a checkpoint's adapter tensors, in memory (nothing written):
    the same model `PeftModel.from_pretrained(model, DIR)` gives for DIR = `export_peft(...)`.
    Every tensor must land in the model and every adapter tensor be given (else UserError)."""
    import torch

    _quiet_bitsandbytes()
    from peft import PeftModelForCausalLM
    from peft.utils import set_peft_model_state_dict

    config = settings.peft_config()
    config.task_type = "CAUSAL_LM"
    config.inference_mode = True  # as from_pretrained(is_trainable=False): all frozen
    payload = {peft_key(arch, n): t for n, t in tensors.items()}
    state = torch.random.get_rng_state()  # peft draws lora_A's initial values; we overwrite them
    try:
        peft_model = PeftModelForCausalLM(model, config, adapter_name=ADAPTER_NAME)
    finally:
        torch.random.set_rng_state(state)
    result = set_peft_model_state_dict(peft_model, payload, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(
            f"{what}: the adapters do not fit the base model (unexpected "
            f"{result.unexpected_keys[:3]}, missing {missing[:3]})"
        )
    return peft_model.eval()


def attach_adapter(model: Any, adapter_dir: str | os.PathLike, what: str = "--adapter") -> Any:
    """`PeftModel.from_pretrained(model, adapter_dir)`, every failure one UserError naming the
    adapter and the base (an adapter made for another base does not fit its shapes)."""
    _quiet_bitsandbytes()
    from peft import PeftModel

    folder = Path(adapter_dir)
    if not (folder / PEFT_CONFIG).is_file():
        raise UserError(f"{what} {folder}: no {PEFT_CONFIG} (export one with tools/export_lora.py)")
    import warnings

    base = getattr(model.config, "_name_or_path", "the base model")
    check_base_sample(model, folder, what)
    try:
        with warnings.catch_warnings():
            # peft calls a transformers method deprecated in 5.x (FutureWarning): not the user's.
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {folder} does not fit {base}: {first}") from None
    # peft skips tensors of the file that name no parameter of the model, silently; such an
    # adapter (made for another architecture, or with mis-named keys) would change nothing.
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    weights = folder / PEFT_WEIGHTS
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
        unused = sorted(keys - set(get_peft_model_state_dict(peft_model)))
        if unused:
            raise UserError(
                f"{what} {folder} does not fit {base}: {len(unused)} of its tensors name no "
                f"parameter of the model, e.g. {unused[0]}"
            )
    return peft_model


def merge_into_hf(
    hf_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Base HF folder + PEFT adapter -> a full HF folder with W + (alpha/r) B A in every adapted
    matrix (peft's merge), plus the base's tokenizer and generation files. Written whole or not
    at all."""
    import torch
    from transformers import AutoModelForCausalLM

    from openchatkit.fileio import atomic_dir
    from openchatkit.models import sharded
    from openchatkit.models.quiet import quiet_transformers

    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype="auto")
        except (OSError, ValueError) as err:
            raise UserError(f"--base {hf_dir}: cannot load ({str(err).splitlines()[0]})") from None
    dtype = model.dtype
    merged = attach_adapter(model.float(), adapter_dir).merge_and_unload()
    with atomic_dir(Path(out), overwrite=True) as tmp, torch.no_grad():
        merged.to(dtype).save_pretrained(tmp)
        sharded.copy_tokenizer_files(hf_dir, tmp)
    return Path(out)
