"""Merging LoRA adapters into full HF weights: a base HF folder + a PEFT adapter, or a LoRA
trainer checkpoint (its base converted, its adapters exported, merged), each written whole or
not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.models.lora.peft_io import attach_adapter


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


def merge_checkpoint_to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    arch: str | None = None,
    config_name: str | None = None,
    chat_format: str | None = None,
) -> tuple[Path, str]:
    """LoRA trainer checkpoint -> its base converted to HF, the adapter exported, merged: all in
    a temporary folder beside `out`, which appears whole. `arch` None: the base's architecture.
    Returns (out, a one-line description for the user)."""
    import shutil
    import tempfile

    from openchatkit.models.convert import convert_sharded_to_hf
    from openchatkit.models.lora.checkpoint import locate_base, read_adapter_checkpoint
    from openchatkit.models.lora.peft_io import export_peft
    from openchatkit.models.registry import (
        MODEL_TYPES,
        converter_script,
        get_architecture,
        name_for_model_type,
        read_model_type,
    )

    _, meta, settings, tensors = read_adapter_checkpoint(ckpt)
    # The base the adapters were trained on, checked by content as the trainer's resume does.
    base_dir = locate_base(meta, f"--ckpt-path {ckpt}")
    base_type = read_model_type(base_dir)
    ours = name_for_model_type(base_type)
    if arch is None:  # the generic script: the base's architecture
        if ours is None:
            raise UserError(
                f"--ckpt-path {ckpt}: its base model {base_dir} is a {base_type!r} "
                f"model; the converter knows {', '.join(MODEL_TYPES.values())}"
            )
        arch = ours
    if base_type != MODEL_TYPES[arch]:
        raise UserError(
            f"--ckpt-path {ckpt}: its base model {base_dir} is {base_type}, not "
            f"{MODEL_TYPES[arch]}" + (f"; use {converter_script('to_hf', ours)}" if ours else "")
        )
    out = Path(out)
    created = out.parent  # the outermost parent folder this run creates, removed on failure
    while not created.parent.exists():
        created = created.parent
    made = not created.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        base = convert_sharded_to_hf(
            base_dir, work / "base", arch, config_name=config_name, chat_format=chat_format
        )
        adapter = export_peft(
            tensors, settings, get_architecture(arch), meta["base_model"], work / "adapter"
        )
        merge_into_hf(base, adapter, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if made:
            shutil.rmtree(created, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return out, f"{meta['base_model']} + LoRA r={settings.r} ({ckpt}) -> HF"
