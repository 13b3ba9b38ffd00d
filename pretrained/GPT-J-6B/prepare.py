"""Prepare `EleutherAI/gpt-j-6b` from the Hugging Face hub as a layer-sharded base model for fine-tuning.

Writes `pretrained/GPT-J-6B/EleutherAI_gpt-j-6b/` (about 12 GB written in fp16). Downloads resume and reuse the HF
cache; offline, the script says so in one line and exits non-zero.

    python pretrained/GPT-J-6B/prepare.py
    python pretrained/GPT-J-6B/prepare.py --dtype bfloat16 --save-dir /data/pretrained
    # then fine-tune with training/ (see training/README.md), e.g. --model-name pretrained/GPT-J-6B/EleutherAI_gpt-j-6b

No GPU is needed to prepare. See pretrained/README.md for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.convert import pretrained_parser, run_prepare_pretrained

FOLDER = "GPT-J-6B"


def main(argv: list[str] | None = None) -> int:
    args = pretrained_parser(FOLDER, __doc__).parse_args(argv)
    return run_prepare_pretrained(args, FOLDER, Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
