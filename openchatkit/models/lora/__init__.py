"""LoRA in one place: peft's adapters on pipeline stages, their trainer checkpoints, PEFT's
format and merging.

- adapters.py    `LoraSettings` (what `--lora-*` asks for), target checks, injection into a
                 stage (`apply_lora`), which parameters train
- dropout.py     `LoraDropout`: the adapters' input dropout, ~3x faster on CPU (imports torch,
                 so it is not re-exported here)
- checkpoint.py  the LoRA trainer checkpoint: stage files, adapter.json, base fingerprint, the
                 resume check, reading one back
- peft_io.py     PEFT's format: key names, export, attach an `--adapter` folder, a checkpoint's
                 adapters on an HF model in memory, the base-weight sample
- merge.py       adapters merged into full HF weights (an adapter folder, or a LoRA checkpoint)

Importing the package is cheap: torch and peft load on first use, so the trainer's flag checks
can build `LoraSettings`. The names below are the package's API.
"""

from openchatkit.models.lora.adapters import (
    ADAPTER_NAME,
    LoraSettings,
    adapter_state,
    apply_lora,
    check_targets,
    is_adapter_param,
    linear_module_names,
)
from openchatkit.models.lora.checkpoint import (
    ADAPTER_META,
    adapter_meta,
    base_fingerprint,
    check_lora_resume,
    load_adapter_into,
    locate_base,
    read_adapter_checkpoint,
    read_adapter_meta,
    save_adapter_checkpoint,
    save_adapter_stage,
    settings_from_meta,
)
from openchatkit.models.lora.merge import merge_checkpoint_to_hf, merge_into_hf
from openchatkit.models.lora.peft_io import (
    BASE_SAMPLE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    SAMPLE_N,
    attach_adapter,
    base_weight_sample,
    check_base_sample,
    export_peft,
    peft_key,
    peft_model_from_tensors,
)

__all__ = [
    "ADAPTER_META",
    "ADAPTER_NAME",
    "BASE_SAMPLE",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "SAMPLE_N",
    "LoraSettings",
    "adapter_meta",
    "adapter_state",
    "apply_lora",
    "attach_adapter",
    "base_fingerprint",
    "base_weight_sample",
    "check_base_sample",
    "check_lora_resume",
    "check_targets",
    "export_peft",
    "is_adapter_param",
    "linear_module_names",
    "load_adapter_into",
    "locate_base",
    "merge_checkpoint_to_hf",
    "merge_into_hf",
    "peft_key",
    "peft_model_from_tensors",
    "read_adapter_checkpoint",
    "read_adapter_meta",
    "save_adapter_checkpoint",
    "save_adapter_stage",
    "settings_from_meta",
]
