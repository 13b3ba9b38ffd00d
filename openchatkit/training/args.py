"""Command-line flags of `training/dist_clm_train.py` and their validation.

Flag names and meanings follow upstream OpenChatKit; a few are added (`--bf16`, `--seed`,
`--device`, `--evaluation-*`, `--num-checkpoints`, `--loss-on`, ...). Everything here is cheap
(no torch import) so `--help` and bad-input errors are instant, and every contradiction is
reported as one UserError before any process group is made.

Batch semantics: `--batch-size` is the global batch of one pipeline pass, over all data-parallel
replicas together, so a step sees the same sequences whatever `--data-group-size` is and layouts
compare step for step. Replica r of D takes rows [r*B/D, (r+1)*B/D) of it and splits them into
`B / D / --micro-batch-size` micro-batches; one optimizer step consumes
`--gradient-accumulate-step` passes, i.e. batch-size x gradient-accumulate-step sequences.
(Upstream's `--batch-size` was per replica: its global batch grew with the data-parallel size.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openchatkit.errors import UserError

# --model-type name -> HF config.model_type
MODEL_TYPES = {"gptneox": "gpt_neox", "gptj": "gptj", "llama": "llama"}


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
    m.add_argument("--model-type", choices=sorted(MODEL_TYPES), default=None)
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
    t.add_argument("--task-name", required=True, help="data spec: FILE|DIR|HUB_ID[:WEIGHT],...")
    t.add_argument("--seq-length", type=int, default=2048)
    t.add_argument(
        "--batch-size", type=int, default=32, help="global: all data-parallel replicas together"
    )
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--gradient-accumulate-step", type=int, default=1)
    t.add_argument("--total-steps", type=int, default=1000, help="optimizer steps")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--optimizer", choices=["adam", "8bit-adam"], default="adam")
    t.add_argument("--fp16", action="store_true", help="fp16 weights, fp32 master, loss scale")
    t.add_argument("--bf16", action="store_true", help="bf16 weights, fp32 master")
    t.add_argument("--initial-loss-scale", type=float, default=2.0**16)
    t.add_argument("--loss-scale-window", type=int, default=1000)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--loss-on", choices=["all", "bot"], default="all")
    t.add_argument("--reset-position-ids", action="store_true")
    # Memory (issue 11): recompute layers in the backward; the planner's GPU size.
    t.add_argument(
        "--activation-checkpointing",
        choices=["none", "layers"],
        default=None,
        help="recompute each layer in the backward (default: layers on CUDA, none on CPU)",
    )
    t.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: detected)")

    c = p.add_argument_group("checkpoints, evaluation, logs")
    c.add_argument("--checkpoint-path", default="model_ckpts/run")
    c.add_argument("--checkpoint-steps", type=int, default=100, help="0: only at the end")
    c.add_argument("--num-checkpoints", type=int, default=0, help="keep the newest N; 0: all")
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


@dataclass(frozen=True)
class ModelShape:
    """What the trainer needs to know about the model before building it (from config.json)."""

    model_type: str  # HF model_type
    num_layers: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool


def read_model_shape(folder: str | Path) -> ModelShape:
    """Read config.json of a model folder (cheap; no transformers import)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"--model-name {folder}: no config.json there")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--model-name {folder}: unreadable config.json ({err})") from None
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES.values():
        raise UserError(
            f"--model-name {folder}: model_type {model_type!r} is not one of gpt_neox, gptj, llama"
        )
    num_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    tie_default = model_type != "gpt_neox"
    return ModelShape(
        model_type=model_type,
        num_layers=int(num_layers),
        hidden_size=int(hidden),
        vocab_size=int(cfg.get("vocab_size", 0)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
    )


def stage_layer_ranges(num_layers: int, pp: int, per_stage: int | None) -> list[range]:
    """Global layer indices of each pipeline stage.

    Without --num-layers the layers are split as evenly as possible (earlier stages take one
    more). With it, `per_stage x pp` must equal the model's layers. The one exception is the
    original's GPT-NeoX-20B recipe (44 layers as 8 stages x 6): when the layers do not divide by
    pp, `per_stage = ceil(num_layers / pp)` is accepted and the last stage holds the remainder
    (7 x 6 + 2). Any other value is a UserError that names the value to use.
    """
    if pp > num_layers:
        raise UserError(
            f"--pipeline-group-size {pp} exceeds the model's {num_layers} layers "
            "(every stage needs at least one)"
        )
    if per_stage is None:
        base, extra = divmod(num_layers, pp)
        sizes = [base + (1 if s < extra else 0) for s in range(pp)]
        starts = [sum(sizes[:s]) for s in range(pp)]
        return [range(a, a + n) for a, n in zip(starts, sizes, strict=True)]
    ceil = -(-num_layers // pp)
    remainder_fits = num_layers % pp != 0 and (pp - 1) * ceil < num_layers
    if per_stage * pp != num_layers and not (remainder_fits and per_stage == ceil):
        given = (
            f"--num-layers {per_stage} x --pipeline-group-size {pp} = {per_stage * pp}, but "
            f"the model has {num_layers} layers"
        )
        if num_layers % pp == 0:
            hint = f"use --num-layers {num_layers // pp} or leave it out"
        elif remainder_fits:
            rest = num_layers - (pp - 1) * ceil
            hint = (
                f"use --num-layers {ceil} (the last stage takes the other {rest}) or leave it out"
            )
        else:
            hint = f"they do not split into {pp} stages that way; leave --num-layers out"
        raise UserError(f"{given}: {hint}")
    return [range(s * per_stage, min((s + 1) * per_stage, num_layers)) for s in range(pp)]


def validate_args(
    args: argparse.Namespace, shape: ModelShape, cuda_available: Callable[[], bool]
) -> None:
    """Check the flags against each other and the model; fill derived values in place.

    `cuda_available` is called only when --device is not cpu (it imports torch).
    """
    pp, dp = args.pipeline_group_size, args.data_group_size
    if pp < 1:
        raise UserError(f"--pipeline-group-size must be >= 1, got {pp}")
    if dp < 1:
        raise UserError(f"--data-group-size must be >= 1, got {dp}")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other")
    if args.model_type is not None and MODEL_TYPES[args.model_type] != shape.model_type:
        raise UserError(
            f"--model-type {args.model_type} does not match the model's model_type "
            f"{shape.model_type!r} in {args.model_name}/config.json"
        )
    args.layer_ranges = stage_layer_ranges(shape.num_layers, pp, args.num_layers)
    if args.embedding_dim is not None and args.embedding_dim != shape.hidden_size:
        raise UserError(
            f"--embedding-dim {args.embedding_dim} does not match the model's hidden size "
            f"{shape.hidden_size}"
        )
    args.embedding_dim = shape.hidden_size
    for flag in ("seq_length", "batch_size", "micro_batch_size", "gradient_accumulate_step"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.batch_size % dp != 0:
        raise UserError(
            f"--batch-size {args.batch_size} (the global batch) is not divisible by "
            f"--data-group-size {dp}"
        )
    local_batch = args.batch_size // dp
    if local_batch % args.micro_batch_size != 0:
        raise UserError(
            f"--batch-size {args.batch_size} / --data-group-size {dp} = {local_batch} sequences "
            f"per replica, not divisible by --micro-batch-size {args.micro_batch_size}"
        )
    num_micro = local_batch // args.micro_batch_size
    if args.pp_mode == "1f1b" and num_micro < pp:
        raise UserError(
            f"--pp-mode 1f1b needs at least --pipeline-group-size ({pp}) micro-batches, but "
            f"--batch-size / --data-group-size / --micro-batch-size = {num_micro}"
        )
    if args.total_steps < 1:
        raise UserError(f"--total-steps must be >= 1, got {args.total_steps}")
    if not 0 <= args.warmup_steps <= args.total_steps:
        raise UserError(
            f"--warmup-steps must be in [0, --total-steps={args.total_steps}], "
            f"got {args.warmup_steps}"
        )
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.checkpoint_steps < 0:
        raise UserError(f"--checkpoint-steps must be >= 0, got {args.checkpoint_steps}")
    if args.num_checkpoints < 0:
        raise UserError(f"--num-checkpoints must be >= 0, got {args.num_checkpoints}")
    if args.evaluation_steps < 0:
        raise UserError(f"--evaluation-steps must be >= 0, got {args.evaluation_steps}")
    if args.evaluation_steps > 0 and not args.evaluation_data:
        raise UserError("--evaluation-steps needs --evaluation-data")
    if args.peer_timeout < 0:
        raise UserError(f"--peer-timeout must be >= 0 (0 turns it off), got {args.peer_timeout}")
    if args.max_grad_norm < 0:
        raise UserError(f"--max-grad-norm must be >= 0, got {args.max_grad_norm}")
    if args.initial_loss_scale <= 0:
        raise UserError(f"--initial-loss-scale must be > 0, got {args.initial_loss_scale}")
    if args.device is None:
        args.device = "cuda" if cuda_available() else "cpu"
    if args.device == "cuda" and not cuda_available():
        raise UserError("--device cuda, but no CUDA device is visible")
    if args.dp_backend is None:
        args.dp_backend = "nccl" if args.device == "cuda" else "gloo"
    if args.dp_backend == "nccl" and args.device != "cuda":
        raise UserError("--dp-backend nccl needs --device cuda; use --dp-backend gloo on CPU")
    if args.dp_backend == "gloo" and args.device == "cuda" and pp > 1:
        raise UserError(
            "--dp-backend gloo cannot send CUDA tensors between pipeline stages; use "
            "--dp-backend nccl with --device cuda"
        )
    if args.activation_checkpointing is None:
        args.activation_checkpointing = "layers" if args.device == "cuda" else "none"
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise UserError(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}")
    if args.fp16 and args.device == "cpu":
        # Allowed (CPU kernels exist for fp16), just slow; tests use it for the loss scale.
        pass
    if args.tokenizer_name is None:
        args.tokenizer_name = args.model_name
    folder = Path(args.model_name)
    if args.load_pretrained_model and not (folder / "manifest.json").is_file():
        raise UserError(
            f"--model-name {folder}: not a layer-sharded folder (no manifest.json); prepare it "
            "with pretrained/<Model>/prepare.py or tools/convert_from_hf_*.py"
        )


def derived_summary(args: argparse.Namespace) -> dict[str, Any]:
    """Values derived from the flags, printed at start and stored in meta.json."""
    local_batch = args.batch_size // args.data_group_size
    global_batch = args.batch_size * args.gradient_accumulate_step
    return {
        "num_microbatches": local_batch // args.micro_batch_size,
        "replica_batch_sequences": local_batch,
        "global_batch_sequences": global_batch,
        "tokens_per_step": global_batch * args.seq_length,
        "layers_per_stage": [len(r) for r in args.layer_ranges],
    }
