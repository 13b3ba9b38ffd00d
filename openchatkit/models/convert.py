"""Conversion between HF folders and the layer-sharded format, in both directions.

Both directions stream one tensor (HF -> sharded: one layer file) at a time, so a 20B model never
needs its full size in memory, and both write into a temporary folder renamed at the end: a
failure leaves nothing half-written. Every key goes through the architecture's declarative key
map (the architecture's module, `openchatkit/models/registry.py`); an unknown or missing key is an error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from openchatkit import checkpoints
from openchatkit.errors import UserError
from openchatkit.fileio import atomic_dir, check_output_folder
from openchatkit.models import sharded
from openchatkit.models.arch import is_tied
from openchatkit.models.hf_weights import (
    HFWeights,
    SafetensorsFile,
    contained_file,
    plan_shards,
    write_hf_shards,
)
from openchatkit.models.registry import (
    MODEL_TYPES,
    converter_script,
    get_architecture,
    name_for_model_type,
    read_model_type,
)

if TYPE_CHECKING:
    import torch
# torch is imported inside the two conversions, after their input checks: a converter (or
# `--model` given a checkpoint) refuses a bad path, layout or flag without importing it.

CHAT_FORMATS = ("openchatkit",)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """An existing, non-empty output folder is refused unless `overwrite`; so is one that
    cannot be written (checked before a long download or conversion)."""
    check_output_folder(out, overwrite)


def _load_config(source: str | os.PathLike) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read a model config from {source}: {first}") from None


def _check_arch(name: str, model_type: str, what: str, direction: str) -> None:
    """Refuse a model of another architecture, naming the right converter."""
    if name not in MODEL_TYPES:
        raise UserError(f"unsupported architecture {name!r}: use one of {', '.join(MODEL_TYPES)}")
    if model_type != MODEL_TYPES[name]:
        right = name_for_model_type(model_type)
        # Name the script that converts it: the right architecture's, or the generic one.
        hint = f"; use {converter_script(direction, right)}" if right else " (unsupported)"
        raise UserError(f"{what} is a {model_type!r} model, not {MODEL_TYPES[name]!r}{hint}")


# -- HF -> layer-sharded ------------------------------------------------------------------------


def convert_hf_to_sharded(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    architecture: str,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    chat_format: str | None = None,
    source_name: str | None = None,
) -> Path:
    """Convert a local HF folder into a layer-sharded folder at `out`; returns `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    check_output_dir(out, overwrite)
    chat_format = _check_chat_format(chat_format)
    _check_arch(architecture, read_model_type(hf_dir), str(hf_dir), "from_hf")
    arch = get_architecture(architecture)
    config = _load_config(hf_dir)
    weights = HFWeights(hf_dir)
    num_layers = config.num_hidden_layers
    tied = is_tied(config)
    expected = arch.expected_keys(config)

    # Route every HF key to (file, our key, transform) before writing anything.
    plan: dict[str, dict[str, tuple[str, Any]]] = {}
    redundant_head = None  # an LM head stored although tied: checked equal, not duplicated
    for hf_key in weights.keys():
        found = arch.lookup_hf(hf_key)
        if found is None:
            continue
        rule, layer = found
        if rule.part == "layer" and layer >= num_layers:
            raise UserError(
                f"{hf_dir}: key {hf_key!r} is beyond the {num_layers} layers of config.json"
            )
        if rule.part == "head" and tied and rule.ours == arch.lm_head_weight:
            redundant_head = hf_key
            continue
        name = {"embed": sharded.EMBEDDINGS_FILE, "head": sharded.HEAD_FILE}.get(rule.part)
        name = name or sharded.layer_file(layer)
        plan.setdefault(name, {})[rule.ours] = (hf_key, rule.transform)
    for name in sharded.part_files(num_layers):
        part = _part_of(name)
        for key in expected[part]:
            if key not in plan.get(name, {}):
                hf_key = arch.hf_key(part, key, _layer_of(name))[0]
                raise UserError(f"{hf_dir}: missing checkpoint key {hf_key!r}")

    import torch

    # Without --dtype the source's dtype (that of its embedding) is kept, bit for bit.
    target = sharded.parse_dtype(dtype) or weights.dtype(arch.hf_key("embed", arch.embed_weight)[0])
    if redundant_head is not None:
        emb = weights.get(arch.hf_key("embed", arch.embed_weight)[0])
        if not torch.equal(weights.get(redundant_head), emb):
            raise UserError(
                f"{hf_dir}: config ties the embeddings but {redundant_head!r} differs from them"
            )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sharded.make_readable(tmp)
        progress = _progress(num_layers + 2, f"converting {hf_dir.name}")
        for name in sharded.part_files(num_layers):
            tensors = {
                ours: transform.to_ours(weights.get(hf_key), config).to(target)
                for ours, (hf_key, transform) in plan[name].items()
            }
            sharded.save_tensors(tmp / name, tensors)
            progress.update(1)
        progress.close()
        shutil.copyfile(contained_file(hf_dir, "config.json"), tmp / "config.json")
        sharded.copy_tokenizer_files(hf_dir, tmp)
        extra = {"source": source_name or hf_dir.name, "hidden_size": config.hidden_size}
        manifest = sharded.Manifest(
            architecture=arch.name,
            num_layers=num_layers,
            dtype=sharded.dtype_name(target),
            tie_word_embeddings=tied,
            chat_format=chat_format,
            extra=extra,
        )
        sharded.write_manifest(tmp, manifest)
    return out


def _progress(total: int, desc: str):
    """A progress bar over weight files, shown only on a terminal."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not sys.stderr.isatty())


def _part_of(name: str) -> str:
    """The key-map part a weight file holds: embed, layer or head."""
    return {sharded.EMBEDDINGS_FILE: "embed", sharded.HEAD_FILE: "head"}.get(name, "layer")


def _layer_of(name: str) -> int | None:
    return int(name[len("layer_") : -len(".safetensors")]) if name.startswith("layer_") else None


def _check_chat_format(chat_format: str | None) -> str | None:
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise UserError(
            f"unknown chat format {chat_format!r}: use one of {', '.join(CHAT_FORMATS)}"
        )
    return chat_format


# -- layer-sharded (or trainer checkpoint) -> HF ------------------------------------------------


def resolve_checkpoint(ckpt: str | os.PathLike, flag: str = "--ckpt-path") -> Path:
    """The folder holding layer files: CKPT itself, or the checkpoint a `latest` file inside
    CKPT names (`checkpoint_<step>` or a step number, a folder directly inside CKPT: a `latest`
    leading anywhere else is refused). `flag` names the user's flag in errors."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"{flag} {ckpt} is not a folder")
    latest = ckpt / checkpoints.LATEST
    if not sharded.is_sharded_folder(ckpt) and (latest.exists() or latest.is_symlink()):
        named = checkpoints.read_latest(ckpt)
        if named is None:
            raise UserError(
                f"{latest} does not name a checkpoint_<step> folder inside {ckpt} (a `latest` "
                "must hold such a name, or a step number)"
            )
        return named
    return ckpt


def check_trainer_checkpoint(folder: Path, flag: str = "--ckpt-path") -> None:
    """A trainer checkpoint (meta.json) is converted only when the trainer would resume from
    it: manifest.json present and every file meta.json lists there with its size."""
    if not (folder / checkpoints.META).is_file():
        return
    # Only safetensors are read from it (no pickle), so a checkpoint of an older version
    # without the file list is still accepted here.
    problem = checkpoints.verify_checkpoint(folder, hashes=False, require_files=False)
    if problem is None and not sharded.is_sharded_folder(folder):
        problem = "manifest.json is missing"
    if problem is not None:
        raise UserError(
            f"{flag} {folder}: incomplete trainer checkpoint ({problem}); the trainer "
            "skips it too: give an earlier checkpoint_<step>/"
        )


def trained_stage_sizes(folder: Path) -> list[int] | None:
    """Layers per pipeline stage a trainer checkpoint was trained with (from meta.json)."""
    try:
        sizes = json.loads((folder / "meta.json").read_text()).get("layers_per_stage")
    except (OSError, ValueError, AttributeError):
        return None
    return sizes if isinstance(sizes, list) and sizes else None


def read_sharded_source(
    ckpt: str | os.PathLike, config_name: str | None = None, flag: str = "--ckpt-path"
) -> tuple[Path, sharded.Manifest]:
    """Resolve CKPT to its folder and manifest. Per-layer files without a manifest are described
    from the config (`config_name`, else the folder's config.json). The chat format comes from the
    manifest, else from a trainer checkpoint's meta.json."""
    folder = resolve_checkpoint(ckpt, flag)
    check_trainer_checkpoint(folder, flag)
    if sharded.is_sharded_folder(folder):
        manifest = sharded.read_manifest(folder)
    elif (folder / sharded.layer_file(0)).is_file() and (
        config_name or (folder / "config.json").is_file()
    ):
        config = _load_config(config_name or folder)
        manifest = sharded.Manifest(
            architecture=name_for_model_type(config.model_type) or "?",
            num_layers=config.num_hidden_layers,
            dtype="",
            tie_word_embeddings=is_tied(config),
        )
    else:
        raise UserError(
            f"{flag} {ckpt} is neither a layer-sharded folder (manifest.json) nor a trainer "
            f"checkpoint (checkpoint_<step>/ or a folder with `latest`)"
        )
    found = len(list(folder.glob("layer_*.safetensors")))
    if found > manifest.num_layers:
        what = f"config {config_name or folder}" if manifest.dtype == "" else "its manifest.json"
        raise UserError(
            f"{flag} {folder} holds {found} layer files but {what} says {manifest.num_layers} layers"
        )
    meta = folder / "meta.json"
    if manifest.chat_format is None and meta.is_file():
        try:
            manifest.chat_format = json.loads(meta.read_text()).get("chat_format")
        except (OSError, ValueError, AttributeError):
            raise UserError(f"cannot read {meta}") from None
    return folder, manifest


def check_stage_layout(
    num_layers: int, num_stages: int | None, layers_per_stage: int | None
) -> tuple[int, int]:
    """Infer P and L when omitted; check P x L == number of layers when both are given."""
    if num_stages is not None and num_stages < 1:
        raise UserError(f"--n-stages must be >= 1, got {num_stages}")
    if layers_per_stage is not None and layers_per_stage < 1:
        raise UserError(f"--n-layer-per-stage must be >= 1, got {layers_per_stage}")
    if num_stages is not None and layers_per_stage is not None:
        if num_stages * layers_per_stage != num_layers:
            raise UserError(
                f"--n-stages {num_stages} x --n-layer-per-stage {layers_per_stage} = "
                f"{num_stages * layers_per_stage}, but the checkpoint has {num_layers} layers"
            )
    elif num_stages is not None:
        if num_layers % num_stages:
            raise UserError(f"--n-stages {num_stages} does not divide the {num_layers} layers")
        layers_per_stage = num_layers // num_stages
    elif layers_per_stage is not None:
        if num_layers % layers_per_stage:
            raise UserError(
                f"--n-layer-per-stage {layers_per_stage} does not divide {num_layers} layers"
            )
        num_stages = num_layers // layers_per_stage
    else:
        num_stages, layers_per_stage = 1, num_layers
    return num_stages, layers_per_stage


def convert_sharded_to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    architecture: str,
    num_stages: int | None = None,
    layers_per_stage: int | None = None,
    config_name: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    chat_format: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Convert a layer-sharded folder or trainer checkpoint into an HF folder at `out`."""
    out = Path(out)
    # Cheap checks first (no transformers import), so bad input fails within a second.
    check_output_dir(out, overwrite)
    chat_format = _check_chat_format(chat_format)
    folder, manifest = read_sharded_source(ckpt, config_name)
    _check_arch(
        architecture,
        MODEL_TYPES.get(manifest.architecture, manifest.architecture),
        f"--ckpt-path {ckpt}",
        "to_hf",
    )
    num_layers = manifest.num_layers
    check_stage_layout(num_layers, num_stages, layers_per_stage)
    sharded.check_files(folder, manifest)
    config = _load_config(config_name or folder)
    _check_arch(architecture, config.model_type, f"config {config_name or folder}", "to_hf")
    if config.num_hidden_layers != num_layers:
        raise UserError(
            f"config {config_name or folder} has {config.num_hidden_layers} layers, "
            f"the checkpoint {num_layers}"
        )
    arch = get_architecture(architecture)
    expected = arch.expected_keys(config)

    import torch

    # (hf key, file, our key, transform) for every tensor, checked against the key map.
    entries = []
    target = sharded.parse_dtype(dtype)
    for name in sharded.part_files(num_layers):
        part = _part_of(name)
        path = folder / name
        f = SafetensorsFile(path)
        keys = f.keys()
        for key in expected[part]:
            if key not in keys:
                raise UserError(f"{path} lacks tensor {key!r}")
        for key in keys:
            if key not in expected[part]:
                raise UserError(f"{path} has unknown tensor {key!r}")
            hf_key, transform = arch.hf_key(part, key, _layer_of(name))
            entries.append((hf_key, f, key, transform))
    # Without --dtype the checkpoint's dtype (that of its embedding) is kept, bit for bit.
    embeddings = SafetensorsFile(folder / sharded.EMBEDDINGS_FILE)
    out_dtype = target or embeddings.dtype(arch.embed_weight)
    specs = []
    for hf_key, f, key, transform in entries:
        # The HF shape, found by running the transform on a meta tensor (no data).
        meta = torch.empty(f.shape(key), dtype=f.dtype(key), device="meta")
        specs.append((hf_key, out_dtype, list(transform.to_hf(meta, config).shape)))
    shards = plan_shards(specs, max_shard_bytes or _default_shard_bytes())

    def produce():
        for hf_key, f, key, transform in entries:
            yield hf_key, transform.to_hf(f.get_tensor(key), config).to(out_dtype)

    chat_format = chat_format or manifest.chat_format
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sharded.make_readable(tmp)
        write_hf_shards(tmp, shards, produce())
        config.dtype = out_dtype
        config.save_pretrained(tmp)
        _write_tokenizer(folder, config_name, tmp, chat_format)
    return out


def _default_shard_bytes() -> int:
    from openchatkit.models.hf_weights import MAX_SHARD_BYTES

    return int(os.environ.get("OPENCHATKIT_MAX_SHARD_BYTES", MAX_SHARD_BYTES))


def _write_tokenizer(
    folder: Path, config_name: str | None, out: Path, chat_format: str | None
) -> None:
    """Copy the tokenizer (from the checkpoint, else from --config-name) and generation config;
    with the OpenChatKit chat format, set its <human>/<bot> chat template."""
    copied = sharded.copy_tokenizer_files(folder, out)
    tokenizer_files = [n for n in copied if n != "generation_config.json"]
    if not tokenizer_files and config_name is not None:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(config_name).save_pretrained(out)
            tokenizer_files = ["tokenizer"]
        except (OSError, ValueError) as err:
            logger.warning("no tokenizer written: {}", str(err).splitlines()[0])
    if not tokenizer_files:
        logger.warning("{} has no tokenizer files; the HF folder carries none", folder)
        return
    if chat_format == "openchatkit":
        from transformers import AutoTokenizer

        from openchatkit.conversation import OPENCHATKIT_CHAT_TEMPLATE

        tokenizer = AutoTokenizer.from_pretrained(out)
        tokenizer.chat_template = OPENCHATKIT_CHAT_TEMPLATE
        (out / "chat_template.jinja").unlink(missing_ok=True)
        tokenizer.save_pretrained(out)
