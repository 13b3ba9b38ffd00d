"""Convert a layer-sharded model, or a trainer checkpoint, of any supported architecture back to an HF folder.

The architecture is read from the input (the folder's manifest.json; for a LoRA checkpoint, its
base's config) and looked up in `openchatkit/models/registry.py`, so every architecture there
converts with this one script. OUT loads with `AutoModelForCausalLM.from_pretrained(OUT)` and
carries the tokenizer, the generation config and a chat template (OpenChatKit's <human>/<bot> one
when the checkpoint was fine-tuned on that format). P and L are inferred; when given they are
checked against the layers.

    # the newest checkpoint the trainer wrote (the folder holding `latest`)
    python tools/convert_to_hf.py --ckpt-path model_ckpts/my-run --save-path huggingface_models/my-run
    # one checkpoint, 4 stages x 8 layers, cast to fp16
    python tools/convert_to_hf.py --ckpt-path model_ckpts/my-run/checkpoint_100 \
        --save-path OUT --n-stages 4 --n-layer-per-stage 8 --fp16
    # a LoRA checkpoint: its base with the adapters merged in
    python tools/convert_to_hf.py --ckpt-path model_ckpts/my-lora-run --merge-lora --save-path OUT

CPU only; no GPU is needed. See tools/README.md for every flag.
"""

from __future__ import annotations

import sys

from openchatkit.cli import run_main
from openchatkit.cli.convert import run_to_hf, to_hf_parser


def main(argv: list[str] | None = None) -> int:
    args = to_hf_parser(None, __doc__).parse_args(argv)
    return run_to_hf(args, None)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
