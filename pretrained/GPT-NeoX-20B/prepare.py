"""Prepare `EleutherAI/gpt-neox-20b` from the Hugging Face hub as a layer-sharded base model for fine-tuning.

Writes `pretrained/GPT-NeoX-20B/EleutherAI_gpt-neox-20b/` (about 41 GB download (fp16), 41 GB written; the conversion holds one layer (~1 GB) in memory). Downloads resume and reuse the HF
cache; offline, the script says so in one line and exits non-zero.

    python pretrained/GPT-NeoX-20B/prepare.py
    python pretrained/GPT-NeoX-20B/prepare.py --dtype bfloat16 --save-dir /data/pretrained
    # then fine-tune with training/ (see training/README.md), e.g. --model-name pretrained/GPT-NeoX-20B/EleutherAI_gpt-neox-20b

No GPU is needed to prepare. See pretrained/README.md for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.convert import pretrained_parser, run_prepare_pretrained

FOLDER = "GPT-NeoX-20B"


def main(argv: list[str] | None = None) -> int:
    args = pretrained_parser(FOLDER, __doc__).parse_args(argv)
    return run_prepare_pretrained(args, FOLDER, Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
