"""Convert an HF model of any supported architecture into the layer-sharded format the trainer loads stage by stage.

The architecture is read from the model's config.json (`model_type`) and looked up in
`openchatkit/models/registry.py`, so every architecture there converts with this one script.
Reads the HF safetensors (or .bin) shards one tensor at a time, so memory stays near one layer.

    # a hub model (downloaded with resume into the HF cache), written to DIR/<org>_<name>/
    python tools/convert_from_hf.py --model-name Qwen/Qwen2.5-0.5B-Instruct --save-dir pretrained/custom
    # a local HF folder, written exactly to OUT
    python tools/convert_from_hf.py --model-name path/to/hf_folder --save-path OUT --dtype float16

CPU only; no GPU is needed. See tools/README.md for every flag.
"""

from __future__ import annotations

import sys

from openchatkit.cli import run_main
from openchatkit.cli.convert import from_hf_parser, run_from_hf


def main(argv: list[str] | None = None) -> int:
    args = from_hf_parser(None, __doc__).parse_args(argv)
    return run_from_hf(args, None)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
