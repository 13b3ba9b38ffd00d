"""Fine-tune a causal LM with a pipeline (GPipe or 1F1B) x data-parallel layout.

One process per rank. The launchers in this folder start them; `torchrun` works too.

Tiny CPU run (2 pipeline stages on gloo; prepare the model first with
`python pretrained/SmolLM2-135M-Instruct/prepare.py`):
    python training/launch.py --nproc 2 --device cpu -- training/dist_clm_train.py \
        --model-name pretrained/SmolLM2-135M-Instruct/HuggingFaceTB_SmolLM2-135M-Instruct \
        --task-name data/OIG-sample/train.jsonl --pipeline-group-size 2 \
        --seq-length 128 --batch-size 4 --micro-batch-size 2 --total-steps 20 \
        --checkpoint-path model_ckpts/smollm2-demo --device cpu

One GPU (a single stage):
    python training/dist_clm_train.py --model-name MODEL_DIR --task-name data/OIG/files \
        --seq-length 2048 --batch-size 32 --micro-batch-size 1 --bf16 --checkpoint-path CKPT

Many GPUs (8 stages x 1 replica, as upstream's GPT-NeoX-20B recipe):
    bash training/train-gpt-neox-chat-base-20b.sh
  or with torchrun:
    torchrun --nproc-per-node 8 training/dist_clm_train.py --pipeline-group-size 8 ...

A restart with the same --checkpoint-path resumes from its `latest` checkpoint automatically,
also under another --pipeline-group-size x --data-group-size. See training/README.md.
"""

from __future__ import annotations

import os
import sys

from openchatkit.cli import run_main, setup_logging

# c10d logs each failed store call of a rank whose peer died as a C++ warning with 20 stack
# frames; the peer watchdog says what happened in one line, so only C++ errors are shown
# (read when torch loads: set before it is imported). TORCH_CPP_LOG_LEVEL=INFO shows them all.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
from openchatkit.cli.train import build_parser


def main(argv: list[str] | None = None) -> int:
    flags = build_parser().parse_args(argv)
    from openchatkit.training.startup import check_run, run_locked

    config, rdv = check_run(flags)
    setup_logging(rank=rdv.rank)
    return run_locked(config, rdv)


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
