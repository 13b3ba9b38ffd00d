"""PEFT's adapter format: our adapter names as the keys `PeftModel.from_pretrained` reads,
export to `adapter_config.json` + `adapter_model.safetensors`, a checkpoint's adapters put on an
HF model in memory, and `--adapter` folders attached with every failure one line.

`export_peft` renames `layers.<i>.self_attn.q_proj.lora_A.default.weight` to the HF model's key
(`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`) through the architecture's
own key map. Beside an exported adapter, `BASE_SAMPLE` records evenly spaced values of one adapted
base weight, so that loading it on another base of the same shapes is refused rather than
silently wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError
from openchatkit.models.lora.adapters import ADAPTER_NAME, LoraSettings, quiet_bitsandbytes

if TYPE_CHECKING:
    import torch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
BASE_SAMPLE = "openchatkit_base.json"
SAMPLE_N = 256


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


def peft_model_from_tensors(
    model: Any, settings: LoraSettings, tensors: dict[str, torch.Tensor], arch: Any, what: str
) -> Any:
    """A PeftModel of `model` with a checkpoint's adapter tensors, in memory (nothing written):
    the same model `PeftModel.from_pretrained(model, DIR)` gives for DIR = `export_peft(...)`.
    Every tensor must land in the model and every adapter tensor be given (else UserError)."""
    import torch

    quiet_bitsandbytes()
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
    quiet_bitsandbytes()
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
