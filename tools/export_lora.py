"""Export the LoRA adapters of a trainer checkpoint in PEFT's format.

DIR gets `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(hf_base, DIR)` loads on the HF form of the base model
(`tools/convert_to_hf_*.py --ckpt-path <base folder>`), `inference/bot.py --adapter DIR` chats
with, and `tools/merge_lora.py` merges.

    python tools/export_lora.py --ckpt-path model_ckpts/smollm2-lora --save-path adapters/smollm2-oig

CPU only; seconds. The checkpoint may come from any pipeline x data layout.
"""

from __future__ import annotations

import argparse
import sys

from openchatkit.cli import run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt-path", required=True, help="LoRA checkpoint_<step>/ or the folder holding `latest`"
    )
    p.add_argument("--save-path", required=True, help="output adapter folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from openchatkit.models.convert import check_output_dir
    from openchatkit.models.lora import (
        base_weight_sample,
        export_peft,
        locate_base,
        read_adapter_checkpoint,
    )
    from openchatkit.models.registry import get_architecture, read_model_type

    out = Path(args.save_path)
    check_output_dir(out, args.overwrite)
    folder, meta, settings, tensors = read_adapter_checkpoint(args.ckpt_path)
    # The base must still be the one trained on: its key names decide the exported ones.
    base = locate_base(meta, f"--ckpt-path {args.ckpt_path}")
    arch = get_architecture(read_model_type(base))
    sample = base_weight_sample(base, arch, tensors)
    export_peft(tensors, settings, arch, meta["base_model"], out, base_sample=sample)
    print(f"{folder}: {len(tensors)} adapter tensors (r={settings.r}) -> PEFT", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
