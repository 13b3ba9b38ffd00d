"""Prepare the embedded SmolLM2-135M-Instruct (no network needed) as a layer-sharded base model for fine-tuning.

Writes `pretrained/SmolLM2-135M-Instruct/HuggingFaceTB_SmolLM2-135M-Instruct/` (offline: the bundled GGUF model, converted once (~20 s), 540 MB written in fp32). Downloads resume and reuse the HF
cache; offline, the script says so in one line and exits non-zero.

    python pretrained/SmolLM2-135M-Instruct/prepare.py
    python pretrained/SmolLM2-135M-Instruct/prepare.py --dtype bfloat16 --save-dir /data/pretrained
    # then fine-tune with training/ (see training/README.md), e.g. --model-name pretrained/SmolLM2-135M-Instruct/HuggingFaceTB_SmolLM2-135M-Instruct

No GPU is needed to prepare. See pretrained/README.md for every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.convert import pretrained_parser, run_prepare_pretrained

FOLDER = "SmolLM2-135M-Instruct"


def main(argv: list[str] | None = None) -> int:
    args = pretrained_parser(FOLDER, __doc__).parse_args(argv)
    return run_prepare_pretrained(args, FOLDER, Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
