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
from openchatkit.training.memory import check_before_training


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_bytes(cuda_id: int) -> int:
    import torch

    return torch.cuda.get_device_properties(cuda_id).total_memory


def main(argv: list[str] | None = None) -> int:
    flags = build_parser().parse_args(argv)
    # Every check runs before torch is imported (unless the device must be detected) and before
    # any process group exists, so a bad flag costs a fraction of a second.
    from openchatkit.distributed.env import resolve_rendezvous
    from openchatkit.training.config import TrainConfig, read_model_shape

    config = TrainConfig.from_flags(flags, read_model_shape(flags.model_name), _cuda_available)
    from openchatkit.training.preflight import check_checkpoint_path, check_tokenizer

    check_checkpoint_path(config.checkpoint_path)
    check_tokenizer(
        config.tokenizer_name, "--tokenizer-name" if flags.tokenizer_name else "--model-name"
    )
    if config.lora is not None:
        from transformers import AutoConfig

        from openchatkit.models.lora import check_targets

        check_targets(AutoConfig.from_pretrained(config.model_name), config.lora.target_modules)
    # Resuming: the checkpoint's kind (full / LoRA), LoRA settings and base must match; checked
    # before any process group exists, so every rank stops at once instead of after set-up.
    from openchatkit.checkpoints import find_latest
    from openchatkit.training.trainer import check_resume_kind

    latest = find_latest(config.checkpoint_path, verify=False)
    if latest is not None:
        from openchatkit.errors import UserError

        try:
            check_resume_kind(latest, config)
        except UserError as err:
            if "unreadable" not in str(err):
                raise
            # A damaged newest checkpoint: the trainer's verified search skips it (hashing
            # every file, which is not worth doing twice here).
    # Refuse before any allocation when a stage will not fit its GPU (CUDA only).
    check_before_training(config, device_bytes=_device_bytes)
    rdv = resolve_rendezvous(config.rank, config.world_size, config.dist_url, config.pp, config.dp)
    setup_logging(rank=rdv.rank)
    from openchatkit.training.lock import CheckpointLock, release_on_sigterm

    # One run per checkpoint folder: rank 0 holds <checkpoint-path>/.lock for the whole run
    # and releases it on any way out (SIGTERM included; the watchdog's exit: see trainer).
    lock = CheckpointLock.acquire(config.checkpoint_path) if rdv.rank == 0 else None
    if lock is not None:
        release_on_sigterm()
        from openchatkit.training.checkpoint import remove_stale_temps

        remove_stale_temps(config.checkpoint_path)  # what a killed run left half-written
    try:
        from openchatkit.training.trainer import run_training

        return run_training(config, rdv)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
