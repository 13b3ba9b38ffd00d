"""Convert a layer-sharded GPT-NeoX (GPT-NeoX-20B, Pythia, RedPajama-INCITE) model, or a trainer checkpoint, back to an HF folder.

The upstream OpenChatKit name, kept for recipes that call it: the same as tools/convert_to_hf.py,
except that the model must be a gptneox one (another architecture is refused in one line
naming the script that converts it).

OUT loads with `AutoModelForCausalLM.from_pretrained(OUT)` and carries the tokenizer, the
generation config and a chat template (OpenChatKit's <human>/<bot> one when the checkpoint was
fine-tuned on that format). P and L are inferred; when given they are checked against the layers.

    # the newest checkpoint the trainer wrote (the folder holding `latest`)
    python tools/convert_to_hf_gptneox.py --ckpt-path model_ckpts/my-run --save-path huggingface_models/my-run
    # one checkpoint, 4 stages x 8 layers, cast to fp16
    python tools/convert_to_hf_gptneox.py --ckpt-path model_ckpts/my-run/checkpoint_100 \
        --save-path OUT --n-stages 4 --n-layer-per-stage 8 --fp16

CPU only; no GPU is needed. See tools/README.md for every flag.
"""

from __future__ import annotations

import sys

from openchatkit.cli import run_main
from openchatkit.cli.convert import run_to_hf, to_hf_parser

ARCH = "gptneox"


def main(argv: list[str] | None = None) -> int:
    args = to_hf_parser(ARCH, __doc__).parse_args(argv)
    return run_to_hf(args, ARCH)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
