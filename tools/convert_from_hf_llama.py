"""Convert an HF Llama (Llama-2-7B-32K, SmolLM2) model into the layer-sharded format the trainer loads stage by stage.

The upstream OpenChatKit name, kept for recipes that call it: the same as tools/convert_from_hf.py,
except that the model must be a llama one (another architecture is refused in one line
naming the script that converts it).

Reads the HF safetensors (or .bin) shards one tensor at a time, so memory stays near one layer.

    # a hub model (downloaded with resume into the HF cache), written to DIR/<org>_<name>/
    python tools/convert_from_hf_llama.py --model-name huggingface_models/SmolLM2-135M-Instruct --save-dir pretrained/custom
    # a local HF folder, written exactly to OUT
    python tools/convert_from_hf_llama.py --model-name path/to/hf_folder --save-path OUT --dtype float16

CPU only; no GPU is needed. See tools/README.md for every flag.
"""

from __future__ import annotations

import sys

from openchatkit.cli import run_main
from openchatkit.cli.convert import from_hf_parser, run_from_hf

ARCH = "llama"


def main(argv: list[str] | None = None) -> int:
    args = from_hf_parser(ARCH, __doc__).parse_args(argv)
    return run_from_hf(args, ARCH)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
