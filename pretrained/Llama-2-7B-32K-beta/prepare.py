"""Prepare `togethercomputer/LLaMA-2-7B-32K` from the Hugging Face hub as a layer-sharded base model for fine-tuning.

Writes `pretrained/Llama-2-7B-32K-beta/togethercomputer_LLaMA-2-7B-32K/` (about 13.5 GB written in fp16). Downloads resume and reuse the HF
cache; offline, the script says so in one line and exits non-zero.

    python pretrained/Llama-2-7B-32K-beta/prepare.py
    python pretrained/Llama-2-7B-32K-beta/prepare.py --dtype bfloat16 --save-dir /data/pretrained
    # then fine-tune with training/ (see training/README.md), e.g. --model-name pretrained/Llama-2-7B-32K-beta/togethercomputer_LLaMA-2-7B-32K

No GPU is needed to prepare. See pretrained/README.md for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.convert import pretrained_parser, run_prepare_pretrained

FOLDER = "Llama-2-7B-32K-beta"


def main(argv: list[str] | None = None) -> int:
    args = pretrained_parser(FOLDER, __doc__).parse_args(argv)
    return run_prepare_pretrained(args, FOLDER, Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
