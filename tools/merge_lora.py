"""Merge a PEFT LoRA adapter into its HF base model: a full HF folder, no peft needed to load it.

    python tools/merge_lora.py --base huggingface_models/SmolLM2-135M-Instruct \
        --adapter adapters/smollm2-oig --save-path huggingface_models/SmolLM2-135M-OIG-lora

Each adapted matrix becomes W + (alpha / r) B A (peft's `merge_and_unload`), kept in the base's
dtype; the tokenizer, generation config and chat template come from the base. An adapter made
for another base is refused in one line naming both. For a trainer checkpoint in one step:
`tools/convert_to_hf_<arch>.py --ckpt-path CKPT --merge-lora --save-path OUT`. CPU only.
"""

from __future__ import annotations

import argparse
import sys

from openchatkit.cli import run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", required=True, help="HF folder of the base model")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (tools/export_lora.py)")
    p.add_argument("--save-path", required=True, help="output HF folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from openchatkit.cli.chat import check_adapter_folder
    from openchatkit.errors import UserError
    from openchatkit.fileio import check_output_folder

    # The folders first: a typo is told before torch is imported.
    if not (Path(args.base) / "config.json").is_file():
        raise UserError(f"--base {args.base}: not an HF model folder (no config.json)")
    out = Path(args.save_path)
    check_output_folder(out, args.overwrite)
    check_adapter_folder(args.adapter)
    from openchatkit.models.lora import merge_into_hf

    merge_into_hf(args.base, args.adapter, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
