"""The model under evaluation: the embedded model, an HF folder or hub id, or — converted in memory,
nothing written — a layer-sharded folder or a trainer `--checkpoint-path` (its latest checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.models.loading import LoadedModel, load_chat_model, pick_device, pick_dtype


def is_sharded_source(name: str | None) -> bool:
    """A local folder in the layer-sharded format, a checkpoint_<step>/ or a trainer
    --checkpoint-path (a folder with `latest` or checkpoint_<step>/ folders)."""
    if not name:
        return False
    path = Path(name).expanduser()
    if not path.is_dir():
        return False
    return (
        (path / "manifest.json").is_file()
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


def load_eval_model(name: str | None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load any MODEL `eval.py` accepts; user mistakes are one-line UserErrors."""
    if not is_sharded_source(name):
        return load_chat_model(name, device=device, dtype=dtype)
    assert name is not None
    return load_sharded_in_memory(Path(name).expanduser(), device, dtype)


def load_sharded_in_memory(source: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Build the HF model of a layer-sharded folder or trainer checkpoint in memory: every tensor
    through the architecture's key map, exactly as `tools/convert_to_hf_*.py` would write it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from openchatkit.models import sharded
    from openchatkit.models.convert import read_sharded_source
    from openchatkit.models.hf_weights import SafetensorsFile
    from openchatkit.models.loading import quiet_transformers
    from openchatkit.models.registry import get_architecture

    if not (source / "latest").exists() and any(source.glob("checkpoint_*/meta.json")):
        from openchatkit.training.checkpoint import find_latest

        source = find_latest(source) or source
    folder, manifest = read_sharded_source(source)
    sharded.check_files(folder, manifest)
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
    dev = pick_device(device, 0)
    torch_dtype = pick_dtype(dtype, dev)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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
    return LoadedModel(model, tokenizer, display, dev, str(torch_dtype).split(".")[-1], int(window))
