"""Prepare `Qwen/Qwen2.5-0.5B-Instruct` from the Hugging Face hub as a layer-sharded base model for fine-tuning.

Writes `pretrained/Qwen2.5-0.5B-Instruct/Qwen_Qwen2.5-0.5B-Instruct/` (about 1 GB written in bf16, the dtype it was trained in). Downloads resume and reuse the HF
cache; offline, the script says so in one line and exits non-zero.

    python pretrained/Qwen2.5-0.5B-Instruct/prepare.py
    python pretrained/Qwen2.5-0.5B-Instruct/prepare.py --dtype float32 --save-dir /data/pretrained
    # then fine-tune with training/finetune-qwen2.5-0.5b-instruct.sh, or --model-name pretrained/Qwen2.5-0.5B-Instruct/Qwen_Qwen2.5-0.5B-Instruct

No GPU is needed to prepare. See pretrained/README.md for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.convert import pretrained_parser, run_prepare_pretrained

FOLDER = "Qwen2.5-0.5B-Instruct"


def main(argv: list[str] | None = None) -> int:
    args = pretrained_parser(FOLDER, __doc__).parse_args(argv)
    return run_prepare_pretrained(args, FOLDER, Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
