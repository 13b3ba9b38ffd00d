"""Prepare `togethercomputer/RedPajama-INCITE-7B-Base` from the Hugging Face hub as a layer-sharded base model for fine-tuning.

Writes `pretrained/RedPajama-7B/togethercomputer_RedPajama-INCITE-7B-Base/` (about 14 GB written in fp16). Downloads resume and reuse the HF
cache; offline, the script says so in one line and exits non-zero.

    python pretrained/RedPajama-7B/prepare.py
    python pretrained/RedPajama-7B/prepare.py --dtype bfloat16 --save-dir /data/pretrained
    # then fine-tune with training/ (see training/README.md), e.g. --model-name pretrained/RedPajama-7B/togethercomputer_RedPajama-INCITE-7B-Base

No GPU is needed to prepare. See pretrained/README.md for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.convert import pretrained_parser, run_prepare_pretrained

FOLDER = "RedPajama-7B"


def main(argv: list[str] | None = None) -> int:
    args = pretrained_parser(FOLDER, __doc__).parse_args(argv)
    return run_prepare_pretrained(args, FOLDER, Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
