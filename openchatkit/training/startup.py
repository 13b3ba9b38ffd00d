"""The trainer's start-up, from parsed flags to a running rank.

Every check that can refuse a run comes first, before torch is imported (unless the device must
be detected) and before any process group exists, so a bad flag costs a fraction of a second and
every rank stops at once: the flags (`TrainConfig.from_flags`), the checkpoint folder and the
tokenizer, LoRA targets, the kind of checkpoint a resume would read, and whether each stage fits
its GPU. Then the rendezvous, the run lock (rank 0), and the run. `training/dist_clm_train.py`
is the script; it only parses the flags and sets up logging between the two halves.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from openchatkit.distributed.env import Rendezvous, resolve_rendezvous
from openchatkit.training.config import TrainConfig


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_bytes(cuda_id: int) -> int:
    import torch

    return torch.cuda.get_device_properties(cuda_id).total_memory


def check_run(
    flags: argparse.Namespace,
    cuda_available: Callable[[], bool] = _cuda_available,
    device_bytes: Callable[[int], int] = _device_bytes,
) -> tuple[TrainConfig, Rendezvous]:
    """Every refusal a run can get before it starts, then this rank's rendezvous. Raises
    UserError (one line) for a user mistake."""
    from openchatkit.training.config import read_model_shape
    from openchatkit.training.memory import check_before_training
    from openchatkit.training.preflight import check_checkpoint_path, check_tokenizer

    config = TrainConfig.from_flags(flags, read_model_shape(flags.model_name), cuda_available)
    check_checkpoint_path(config.checkpoint_path)
    check_tokenizer(
        config.tokenizer_name, "--tokenizer-name" if flags.tokenizer_name else "--model-name"
    )
    if config.lora is not None:
        from transformers import AutoConfig

        from openchatkit.models.lora import check_targets

        check_targets(AutoConfig.from_pretrained(config.model_name), config.lora.target_modules)
    check_resume_target(config)
    # Refuse before any allocation when a stage will not fit its GPU (CUDA only).
    check_before_training(config, device_bytes=device_bytes)
    rdv = resolve_rendezvous(config.rank, config.world_size, config.dist_url, config.pp, config.dp)
    return config, rdv


def check_resume_target(config: TrainConfig) -> None:
    """Resuming: the newest checkpoint's kind (full / LoRA), LoRA settings, base and optimizer
    state must suit this run. A damaged newest checkpoint is left to the trainer, whose verified
    search skips it (its files' sizes are checked here, not their hashes: not worth reading
    every file twice)."""
    from openchatkit.checkpoints import find_latest, verify_checkpoint

    latest = find_latest(config.checkpoint_path, verify=False)
    if latest is not None and verify_checkpoint(latest, hashes=False) is None:
        # Imported only when resuming (the trainer module imports torch): a new run's other
        # refusals (a checkpoint folder in use, say) come without it.
        from openchatkit.training.trainer import check_resume_kind

        check_resume_kind(latest, config)


def run_locked(config: TrainConfig, rdv: Rendezvous) -> int:
    """Train on this rank; rank 0 holds <checkpoint-path>/.lock for the whole run (one run per
    checkpoint folder) and releases it on any way out (SIGTERM included; the watchdog's exit:
    see trainer). Returns the exit code."""
    from openchatkit.training.lock import CheckpointLock, release_on_sigterm

    # The lock comes before the trainer's imports (torch): a folder in use is refused at once.
    lock = CheckpointLock.acquire(config.checkpoint_path) if rdv.rank == 0 else None
    if lock is not None:
        release_on_sigterm()
    try:
        if lock is not None:
            from openchatkit.training.checkpoint import remove_stale_temps

            remove_stale_temps(config.checkpoint_path)  # what a killed run left half-written
        from openchatkit.training.trainer import run_training

        return run_training(config, rdv)
    finally:
        if lock is not None:
            lock.release()
