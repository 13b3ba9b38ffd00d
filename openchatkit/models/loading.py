"""Load a causal LM and its tokenizer for chatting: from a local HF folder, the hub, or the embedded
default model, on the device, dtype and memory budget the user asked for. Callers load through
`models/any_model.py` (every MODEL form), which hands these forms to `load_chat_model` and builds
layer-sharded folders and trainer or LoRA checkpoints in memory."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.hub import check_hub_repo, is_cached
from openchatkit.models.embedded import EMBEDDED_MODEL_NAME, ensure_embedded_model, is_embedded_name
from openchatkit.models.quiet import quiet_transformers  # also imported from here by callers

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    device: str
    dtype: str
    context_window: int
    # Decoding settings the model's generation_config.json sets explicitly (do_sample,
    # temperature, top_k, top_p): the bot uses them where the user gave no flag.
    generation_defaults: dict = field(default_factory=dict)


def looks_like_path(name: str) -> bool:
    """A name that can only mean a local folder: absolute, ./ or ../, ~, or an existing path."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name) or name.count("/") > 1


def resolve_model(name: str | None) -> tuple[str, str]:
    """Map `--model` to (what from_pretrained takes, a display name). Raises UserError."""
    if is_embedded_name(name):
        return str(ensure_embedded_model()), EMBEDDED_MODEL_NAME
    assert name is not None
    if looks_like_path(name):
        path = Path(name).expanduser()
        if path.exists() and not path.is_dir():
            raise UserError(f"--model: {name} is a file; give the model's folder")
        if not path.is_dir():
            raise UserError(f"--model: folder {name} does not exist")
        if not (path / "config.json").is_file():
            raise UserError(f"--model: {name} has no config.json; is it an HF model folder?")
        return str(path), path.name
    check_hub_id(name)
    return name, name


def check_hub_id(name: str, flag: str = "--model") -> None:
    """`name` is a well-formed hub id that is cached or that the hub serves now; UserError
    naming `flag` otherwise."""
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name):
        raise UserError(f"{flag}: '{name}' is neither a folder nor a hub id like org/name")
    if not is_cached(name):
        check_hub_repo(name, what=flag)


def parse_gpu_vram(entries: list[str] | None) -> dict[int, str]:
    """`-g 0:10 1:12` → {0: "10GiB", 1: "12GiB"} for accelerate's max_memory."""
    out: dict[int, str] = {}
    for entry in entries or []:
        m = re.fullmatch(r"(\d+):(\d+(?:\.\d+)?)", entry)
        if not m:
            raise UserError(f"-g/--gpu-vram: '{entry}' is not ID:GiB (e.g. 0:10)")
        out[int(m.group(1))] = f"{m.group(2)}GiB"
    return out


def cuda_certainly_absent() -> bool:
    """True when no CUDA device can be visible, known without importing torch (seconds of CPU):
    the device list is hidden (CUDA_VISIBLE_DEVICES empty or -1), or a Linux host has no GPU
    device node (NVIDIA's /dev/nvidia*, ROCm's /dev/kfd, WSL's /dev/dxg). False: ask torch."""
    import glob

    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return True
    if sys.platform.startswith("linux"):
        nodes = glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd") + glob.glob("/dev/dxg")
        return not nodes
    return False


def pick_device(device: str, gpu_id: int) -> str:
    """'cpu' or 'cuda:<gpu_id>' for --device auto|cpu|cuda; UserError when CUDA is asked for and
    absent. Decided without torch where no GPU can be there, so that a bad flag combination
    (--device cuda, -g, --load-in-8bit on a CPU host) is refused before the seconds of its import."""
    if device == "cpu":
        return "cpu"
    if cuda_certainly_absent():
        if device == "cuda":
            raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
        return "cpu"
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
        if gpu_id >= torch.cuda.device_count():
            raise UserError(
                f"--gpu-id {gpu_id}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return f"cuda:{gpu_id}"
    return "cpu"


def pick_dtype(dtype: str, device: str, declared: str | None = None):
    """The torch dtype for `--dtype`. `auto`: on a GPU its half type; on a CPU the weights' own
    precision (`declared`, what the model's config says it stores, as transformers' "auto"
    reads it), except that half-precision weights run in bf16 where the CPU has native bf16
    and in fp32 elsewhere (half arithmetic is emulated there, and slower)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            # The chosen GPU's own capability: is_bf16_supported() looks at the current device
            # (GPU 0) and counts emulated bf16, which pre-Ampere GPUs run far slower than fp16.
            index = int(device.split(":")[1]) if ":" in device else 0
            return cuda_half_dtype(torch.cuda.get_device_capability(index))
        # fp32 weights stay fp32 on a CPU, though bf16 decodes 1.3-1.7x faster where native
        # (benchmarks/bench_bot.py): a short fp32 fine-tune's changes are finer than bf16 holds
        # for many weights (`make demo`'s model: perplexity 4.57 in fp32, 4.95 in bf16), and the
        # kit evaluates in fp32, so the bot would chat with another model than the one measured.
        if declared in ("bfloat16", "float16") and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def declared_dtype(source: str) -> str | None:
    """The dtype an HF model's config says its weights are stored in ("float32", "bfloat16",
    ...): `dtype` (transformers 5) or `torch_dtype`; None when it says none or the config is
    not on this machine (a hub model's is read from the local cache only)."""
    path = Path(source) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # not a repo id the cache can look up
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def cuda_half_dtype(capability: tuple[int, int]):
    """bf16 on GPUs with native bf16 tensor cores (compute capability >= 8.0, Ampere on),
    fp16 before."""
    import torch

    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def int8_config(offload: bool):
    """bitsandbytes int8 for --load-in-8bit. With -g/-r some modules may be placed on the CPU,
    which transformers refuses for int8 unless they stay fp32 there
    (`llm_int8_enable_fp32_cpu_offload`)."""
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload
    )


def offload_max_memory(
    max_gpu: dict[int, str], cpu_ram: float | None, gpu_id: int, gpu_total_bytes: int
) -> dict:
    """accelerate's max_memory for -g/-r: the -g entries, or, with only -r, the chosen GPU at
    90 % of its memory (room for activations and the KV cache), then the CPU's share. Without a
    GPU entry accelerate would map the whole model to the CPU while inputs go to the GPU."""
    max_memory: dict = dict(max_gpu) if max_gpu else {gpu_id: int(0.9 * gpu_total_bytes)}
    if cpu_ram:
        max_memory["cpu"] = f"{cpu_ram}GiB"
    return max_memory


def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16 (Linux; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def load_chat_model(
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    gpu_id: int = 0,
    gpu_vram: list[str] | None = None,
    cpu_ram: float | None = None,
    load_in_8bit: bool = False,
    adapter: str | None = None,
) -> LoadedModel:
    """Load model and tokenizer, mapping every user-fixable failure to a one-line UserError.

    `adapter`: a PEFT LoRA folder put on top of the model (`tools/export_lora.py`); the name
    then reads "base + adapter"."""
    # Every check that needs no torch comes first (a user's mistake is told in a fraction of a
    # second); torch and transformers are imported after them.
    source, display = resolve_model(name)
    max_gpu = parse_gpu_vram(gpu_vram)
    dev = pick_device(device, gpu_id)
    if (max_gpu or cpu_ram) and not dev.startswith("cuda"):
        raise UserError(
            "-g/--gpu-vram and -r/--cpu-ram set GPU memory and CPU offload; no GPU here"
        )
    if load_in_8bit and not dev.startswith("cuda"):
        # Measured here: bitsandbytes 0.50 int8 on CPU answered with blank text at
        # 0.3 tokens/s. bf16 halves memory on CPU without that.
        raise UserError(
            "--load-in-8bit needs a CUDA GPU (bitsandbytes int8 on CPU is broken and "
            "slow); on CPU use --dtype bfloat16 to halve memory"
        )
    check_weight_headers(source, display)
    torch_dtype = pick_dtype(dtype, dev, declared_dtype(source))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": torch_dtype}
    if max_gpu or cpu_ram:
        import torch

        index = int(dev.split(":")[1])
        total = torch.cuda.get_device_properties(index).total_memory
        max_memory = offload_max_memory(max_gpu, cpu_ram, index, total)
        kwargs.update(device_map="auto", max_memory=max_memory)
    if load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise UserError("--load-in-8bit needs bitsandbytes: pip install bitsandbytes") from err
        kwargs["quantization_config"] = int8_config(offload=bool(max_gpu or cpu_ram))
        kwargs.setdefault("device_map", {"": dev})
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as err:  # OSError, ValueError, safetensors' SafetensorError, ...
        if not isinstance(err, (OSError, ValueError)) and not type(err).__module__.startswith(
            "safetensors"
        ):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if type(err).__module__.startswith("safetensors"):
            first = f"a weight file is damaged or truncated ({first})"
        if not Path(source).exists():
            raise UserError(
                f"--model: cannot load '{display}': not a local folder, and the hub could not "
                f"provide it (offline, unknown id, or gated): {first}"
            ) from err
        raise UserError(f"--model: cannot load '{display}': {first}") from err
    if "device_map" not in kwargs:
        model.to(dev)
    if adapter is not None:
        from openchatkit.models.lora.peft_io import attach_adapter

        model = attach_adapter(model, adapter)
        display = f"{display} + adapter {Path(adapter).name}"
    model.eval()
    config = model.config
    window = (
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or getattr(tokenizer, "model_max_length", 2048)
    )
    return LoadedModel(
        model,
        tokenizer,
        display,
        dev,
        str(torch_dtype).split(".")[-1],
        int(window),
        read_generation_defaults(source),
    )


def check_weight_headers(source: str, display: str) -> None:
    """The safetensors weights of a local folder `source` that transformers would read
    (`model.safetensors`, else the shards its index lists) have a sound header and all the bytes
    it describes: header reads only, no torch, so a truncated download is told at once. Anything
    else (a missing shard, .bin weights, a hub id) is left to transformers' own error."""
    import json

    from openchatkit.models.hf_weights import SAFE_INDEX, SafetensorsFile, contained_file

    folder = Path(source)
    if not folder.is_dir():
        return
    names = []
    if (folder / "model.safetensors").is_file():
        names = ["model.safetensors"]
    elif (folder / SAFE_INDEX).is_file():
        try:
            names = sorted(
                {
                    str(n)
                    for n in json.loads((folder / SAFE_INDEX).read_text())["weight_map"].values()
                }
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return  # transformers names the damaged index
    for name in names:
        try:
            path = contained_file(folder, name)
        except UserError:
            continue  # transformers refuses it
        if not path.is_file():
            continue
        try:
            SafetensorsFile(path)
        except (UserError, OSError) as err:
            raise UserError(
                f"--model: cannot load '{display}': a weight file is damaged or truncated ({err})"
            ) from None


GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p")


def read_generation_defaults(source: str) -> dict:
    """The decoding keys present in the model's generation_config.json (local or cached).

    Read from the file rather than `model.generation_config`, which fills every key with HF's
    defaults and so cannot tell "the model asks for greedy" from "nothing said".
    """
    import json

    path = Path(source) / "generation_config.json"
    if not path.is_file():
        if looks_like_path(source):  # a local folder without the file
            return {}
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "generation_config.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in GENERATION_KEYS if config.get(k) is not None}
