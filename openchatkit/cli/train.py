"""Command-line flags of `training/dist_clm_train.py` (argparse only, so `--help` is instant).

Flag names and meanings follow upstream OpenChatKit; a few are added (`--bf16`, `--seed`,
`--device`, `--evaluation-*`, `--num-checkpoints`, `--loss-on`, ...). The parsed flags become a
`openchatkit.training.config.TrainConfig` (checked, with every derived value) in one call,
`TrainConfig.from_flags`, before any process group is made.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from openchatkit.models.registry import architecture_names

if TYPE_CHECKING:
    from openchatkit.training.config import ModelShape, TrainConfig


def _bool_flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist_clm_train.py",
        description="Fine-tune a causal LM with a GPipe/1F1B pipeline x data parallel.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model-name", required=True, help="layer-sharded model folder (prepared)")
    m.add_argument("--tokenizer-name", default=None, help="default: --model-name")
    m.add_argument("--model-type", choices=architecture_names(), default=None)
    m.add_argument("--num-layers", type=int, default=None, help="layers per pipeline stage")
    m.add_argument("--embedding-dim", type=int, default=None, help="hidden size (checked)")
    m.add_argument("--load-pretrained-model", type=_bool_flag, default=True, metavar="true|false")

    d = p.add_argument_group("distributed")
    d.add_argument("--dist-url", default=None, help="tcp://HOST:PORT (default: MASTER_ADDR/PORT)")
    d.add_argument("--world-size", type=int, default=None, help="default: WORLD_SIZE")
    d.add_argument("--rank", type=int, default=None, help="default: RANK")
    d.add_argument("--cuda-id", type=int, default=None, help="default: LOCAL_RANK")
    d.add_argument("--pipeline-group-size", type=int, default=1)
    d.add_argument("--data-group-size", type=int, default=1)
    d.add_argument("--net-interface", default=None, help="sets GLOO/NCCL_SOCKET_IFNAME")
    d.add_argument("--dp-backend", choices=["nccl", "gloo"], default=None)
    d.add_argument("--dp-mode", choices=["allreduce"], default="allreduce")
    d.add_argument("--pp-mode", choices=["gpipe", "1f1b"], default="gpipe")
    d.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    d.add_argument("--pg-timeout", type=float, default=600.0, help="collective timeout, seconds")
    d.add_argument(
        "--peer-timeout",
        type=float,
        default=60.0,
        help="seconds without a heartbeat before a rank is declared dead (0: off)",
    )

    t = p.add_argument_group("training")
    t.add_argument(
        "--task-name",
        required=True,
        help="data spec: FILE|DIR|HUB_ID[:FORMAT][:WEIGHT],... (FORMAT: text or moderation)",
    )
    t.add_argument("--seq-length", type=int, default=2048)
    t.add_argument(
        "--batch-size", type=int, default=32, help="global: all data-parallel replicas together"
    )
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--gradient-accumulate-step", type=int, default=1)
    t.add_argument("--total-steps", type=int, default=1000, help="optimizer steps")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument(
        "--lr-decay-style",
        choices=["linear", "constant"],
        default="linear",
        help="after the warm-up: linear to 0 at --total-steps, or constant",
    )
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--optimizer", choices=["adam", "8bit-adam", "paged-8bit-adam"], default="adam")
    t.add_argument("--fp16", action="store_true", help="fp16 weights, fp32 master, loss scale")
    t.add_argument("--bf16", action="store_true", help="bf16 weights, fp32 master")
    t.add_argument("--initial-loss-scale", type=float, default=2.0**16)
    t.add_argument("--loss-scale-window", type=int, default=1000)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--loss-on", choices=["all", "bot"], default="all")
    t.add_argument("--reset-position-ids", action="store_true")
    t.add_argument(
        "--strict-data",
        action="store_true",
        help="a malformed data line is fatal (default: skipped, one warning per file)",
    )
    # Memory (issue 11): recompute layers in the backward; the planner's GPU size.
    t.add_argument(
        "--activation-checkpointing",
        choices=["none", "layers"],
        default=None,
        help="recompute each layer in the backward (default: layers on CUDA, none on CPU)",
    )
    t.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: detected)")

    lo = p.add_argument_group("LoRA (adapters instead of full fine-tuning)")
    lo.add_argument("--lora-r", type=int, default=0, help="adapter rank; 0: full fine-tuning")
    lo.add_argument("--lora-alpha", type=float, default=None, help="scale numerator (default 2r)")
    lo.add_argument("--lora-dropout", type=float, default=0.05)
    lo.add_argument(
        "--lora-target-modules",
        default=None,
        metavar="NAME,...",
        help="linear modules to adapt (default per architecture: GPT-NeoX query_key_value; "
        "Llama q_proj,k_proj,v_proj,o_proj; GPT-J q_proj,k_proj,v_proj,out_proj)",
    )
    lo.add_argument("--lora-bias", choices=["none", "all", "lora_only"], default="none")
    lo.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="QLoRA: NF4 base weights (bitsandbytes; CUDA or CPU)",
    )

    c = p.add_argument_group("checkpoints, evaluation, logs")
    c.add_argument("--checkpoint-path", default="model_ckpts/run")
    c.add_argument("--checkpoint-steps", type=int, default=100, help="0: only at the end")
    c.add_argument("--num-checkpoints", type=int, default=0, help="keep the newest N; 0: all")
    c.add_argument(
        "--save-timeout",
        type=float,
        default=7200.0,
        help="seconds ranks wait for each other while a checkpoint is written (a 20B "
        "checkpoint is ~288 GB; NCCL's --pg-timeout would abort a slow shared file system)",
    )
    c.add_argument("--evaluation-steps", type=int, default=0, help="0: no evaluation")
    c.add_argument("--evaluation-data", default=None, help="data spec for evaluation")
    c.add_argument("--evaluation-num-batches", type=int, default=4)
    c.add_argument("--train-log-backend", choices=["print", "loguru", "wandb"], default="print")
    c.add_argument("--project-name", default="openchatkit", help="wandb project")
    c.add_argument(
        "--profiling", choices=["no-profiling", "tidy_profiling"], default="no-profiling"
    )
    c.add_argument("--profile-steps", type=int, default=3, help="steps traced by tidy_profiling")
    c.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_with_defaults(shape: ModelShape, **flags: Any) -> TrainConfig:
    """A config for in-process use (tests, benchmarks): the flags' defaults with `flags` (by
    flag name, e.g. `micro_batch_size=2`) on top, checked as the trainer checks them, without
    touching files (no model folder, no data)."""
    from openchatkit.training.config import TrainConfig

    parsed = build_parser().parse_args(["--model-name", "-", "--task-name", "-"])
    vars(parsed).update({"device": "cpu", **flags})
    return TrainConfig.from_flags(parsed, shape, lambda: False, check_files=False)
