"""Any MODEL argument, loaded: the one loader behind the bot, the server, `evaluation/eval.py` and
the moderator. The embedded model, an HF folder or hub id go to `models/loading.py`; a
layer-sharded folder or a trainer `--checkpoint-path` (its latest checkpoint, or a LoRA checkpoint
with its base) is converted in memory, nothing written, into the model the converter would write.

Flags that only make sense for a model read from HF files (-g/-r offload and --load-in-8bit, which
transformers applies while it reads the weights) are refused in one line for the in-memory forms,
naming the converter that makes an HF folder of them.
"""

from __future__ import annotations

from pathlib import Path

from openchatkit import checkpoints
from openchatkit.errors import UserError
from openchatkit.models.loading import (
    LoadedModel,
    load_chat_model,
    pick_device,
    pick_dtype,
    read_generation_defaults,
)

# HF checkpoint key -> the model's parameter name, where transformers 5 renames on load.
MODULE_NAMES = {"embed_out.weight": "lm_head.weight"}


def is_sharded_source(name: str | None) -> bool:
    """A local folder in the layer-sharded format, a checkpoint_<step>/ (full weights or LoRA
    adapters) or a trainer --checkpoint-path (a folder with `latest` or checkpoint_<step>/
    folders)."""
    if not name:
        return False
    path = Path(name).expanduser()
    if not path.is_dir():
        return False
    return (
        (path / "manifest.json").is_file()
        or (path / "adapter.json").is_file()  # a LoRA checkpoint_<step>/: no manifest
        or (path / "latest").exists()
        or (path / "layer_00000.safetensors").is_file()
        or any(path.glob("checkpoint_*/meta.json"))
    )


def weight_file_part(name: str) -> tuple[str, int | None]:
    """(key-map part, global layer index) of a layer-sharded weight file name."""
    from openchatkit.models import sharded

    if name == sharded.EMBEDDINGS_FILE:
        return "embed", None
    if name == sharded.HEAD_FILE:
        return "head", None
    return "layer", int(name.removeprefix("layer_").removesuffix(".safetensors"))


def load_any_model(
    name: str | None,
    device: str = "auto",
    dtype: str = "auto",
    adapter: str | None = None,
    gpu_id: int = 0,
    gpu_vram: list[str] | None = None,
    cpu_ram: float | None = None,
    load_in_8bit: bool = False,
) -> LoadedModel:
    """Load any MODEL, with a PEFT `adapter` on top when given; user mistakes
    are one-line UserErrors. A LoRA trainer checkpoint brings its own base and adapters."""
    if not is_sharded_source(name):
        return load_chat_model(
            name,
            device=device,
            dtype=dtype,
            gpu_id=gpu_id,
            gpu_vram=gpu_vram,
            cpu_ram=cpu_ram,
            load_in_8bit=load_in_8bit,
            adapter=adapter,
        )
    assert name is not None
    source = Path(name).expanduser()
    for flag, value in (
        ("-g/--gpu-vram", gpu_vram),
        ("-r/--cpu-ram", cpu_ram),
        ("--load-in-8bit", load_in_8bit),
    ):
        if value:
            # transformers offloads and quantizes while it reads HF weight files; this model is
            # built in memory from another layout.
            what = describe_source(source)
            merge = " --merge-lora" if what == "a LoRA checkpoint" else ""
            raise UserError(
                f"{flag}: --model {name} is {what}, built in memory, where {flag} does not "
                f"apply; convert it to an HF folder first: python tools/convert_to_hf.py "
                f"--ckpt-path {name}{merge} --save-path huggingface_models/{source.name}"
            )
    folder = checkpoint_folder(source)
    from openchatkit.models.lora.checkpoint import read_adapter_meta
    from openchatkit.models.lora.peft_io import attach_adapter

    if read_adapter_meta(folder) is not None:
        if adapter is not None:
            raise UserError(
                f"--adapter: --model {name} is a LoRA checkpoint and brings its own adapters; "
                "give its base as --model instead"
            )
        return load_lora_checkpoint(source, folder, device, dtype, gpu_id)
    loaded = load_sharded_in_memory(source, device, dtype, gpu_id)
    if adapter is not None:
        loaded.model = attach_adapter(loaded.model, adapter).eval()
        loaded.name = f"{loaded.name} + adapter {Path(adapter).name}"
    return loaded


def describe_source(path: Path) -> str:
    """'a LoRA checkpoint', 'a trainer checkpoint' or 'a layer-sharded folder', for messages."""
    if (path / "adapter.json").is_file() or any(path.glob("checkpoint_*/adapter.json")):
        return "a LoRA checkpoint"
    if (path / "meta.json").is_file() or (path / "latest").exists():
        return "a trainer checkpoint"
    if any(path.glob("checkpoint_*/meta.json")):
        return "a trainer checkpoint"
    return "a layer-sharded folder"


def checkpoint_folder(source: Path) -> Path:
    """The folder a sharded source names: a trainer --checkpoint-path without `latest` gives its
    newest complete checkpoint; `latest` and checkpoint_<step>/ resolve as the converter does."""
    from openchatkit.models.convert import resolve_checkpoint

    if not (source / "latest").exists() and checkpoints.is_checkpoint_root(source):
        source = checkpoints.find_latest(source, require_files=False) or source
    return resolve_checkpoint(source, "--model")


def load_lora_checkpoint(
    source: Path, folder: Path, device: str, dtype: str, gpu_id: int = 0
) -> LoadedModel:
    """A LoRA trainer checkpoint, in memory: the base model its adapter.json names (checked by
    content fingerprint, as the trainer's resume checks it) with the adapters applied through
    peft, the same model as `tools/export_lora.py` + `--adapter` on the converted base."""
    from openchatkit.models.lora.checkpoint import locate_base, read_adapter_checkpoint
    from openchatkit.models.lora.peft_io import peft_model_from_tensors
    from openchatkit.models.registry import get_architecture, read_model_type

    what = f"--model {source}"
    problem = (
        checkpoints.verify_checkpoint(folder, hashes=False, require_files=False)
        if (folder / checkpoints.META).is_file()
        else None
    )
    if problem is not None:
        raise UserError(f"{what}: incomplete LoRA checkpoint {folder.name} ({problem})")
    _, meta, settings, tensors = read_adapter_checkpoint(folder)
    base = locate_base(meta, what)
    loaded = load_sharded_in_memory(base, device, dtype, gpu_id)
    arch = get_architecture(read_model_type(base))
    loaded.model = peft_model_from_tensors(loaded.model, settings, tensors, arch, what)
    # Named as base + adapter, the adapter as a trainer run is named: "my-run/checkpoint_40".
    adapter = folder.name if folder == source else f"{source.name}/{folder.name}"
    loaded.name = f"{loaded.name} + adapter {adapter}"
    return loaded


def load_sharded_in_memory(
    source: Path, device: str = "auto", dtype: str = "auto", gpu_id: int = 0
) -> LoadedModel:
    """Build the HF model of a layer-sharded folder or trainer checkpoint in memory: every tensor
    through the architecture's key map, exactly as `tools/convert_to_hf_*.py` would write it."""
    from openchatkit.models import sharded
    from openchatkit.models.convert import read_sharded_source
    from openchatkit.models.hf_weights import SafetensorsFile
    from openchatkit.models.loading import quiet_transformers
    from openchatkit.models.registry import get_architecture

    if not (source / "latest").exists() and checkpoints.is_checkpoint_root(source):
        # Named "run/checkpoint_N" as when `latest` names it.
        found = checkpoints.find_latest(source, require_files=False)
        folder, manifest = read_sharded_source(found or source, flag="--model")
    else:
        folder, manifest = read_sharded_source(source, flag="--model")
    sharded.check_files(folder, manifest)
    # Imported after the layout checks above: a damaged checkpoint is refused without them.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"--model: cannot read the config of {folder}: {err}") from None
    arch = get_architecture(manifest.architecture)
    expected = arch.expected_keys(config)
    state = {}
    for name in sharded.part_files(manifest.num_layers):
        part, layer = weight_file_part(name)
        f = SafetensorsFile(folder / name)
        for key in f.keys():
            if key not in expected[part]:
                raise UserError(f"--model: {folder / name} has unknown tensor {key!r}")
            hf_key, transform = arch.hf_key(part, key, layer)
            state[hf_key] = transform.to_hf(f.get_tensor(key), config)
    dev = pick_device(device, gpu_id)
    torch_dtype = pick_dtype(dtype, dev)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        names = set(model.state_dict())
        # Keys as HF checkpoints store them; transformers 5 renames a few while loading a folder
        # (GPT-NeoX's `embed_out` is the `lm_head` module): the same here.
        state = {
            MODULE_NAMES.get(k, k) if k not in names and MODULE_NAMES.get(k) in names else k: v
            for k, v in state.items()
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
    tied = (
        {k for k in missing if k.endswith("lm_head.weight")}
        if manifest.tie_word_embeddings
        else set()
    )
    missing = [k for k in missing if k not in tied and "rotary" not in k]
    if missing or unexpected:
        raise UserError(f"--model: {folder}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    model.to(device=dev, dtype=torch_dtype).eval()
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"--model: {folder} carries no usable tokenizer: {err}") from None
    if manifest.chat_format == "openchatkit":
        from openchatkit.conversation import OPENCHATKIT_CHAT_TEMPLATE

        tokenizer.chat_template = OPENCHATKIT_CHAT_TEMPLATE
    window = getattr(config, "max_position_embeddings", None) or 2048
    # A trainer run is named by its folder and the checkpoint taken: "my-run/checkpoint_40".
    display = folder.name if folder == source else f"{source.name}/{folder.name}"
    return LoadedModel(
        model,
        tokenizer,
        display,
        dev,
        str(torch_dtype).split(".")[-1],
        int(window),
        # The converter copies generation_config.json: the HF folder's decoding defaults.
        read_generation_defaults(str(folder)),
    )
