"""The training configuration: the trainer's flags checked once, with every derived value.

`TrainConfig.from_flags(flags, shape, cuda_available)` turns the parsed flags of
`training/dist_clm_train.py` (see `openchatkit/cli/train.py`) into one frozen, typed object:
every contradiction is one UserError before any process group is made, and every value that
follows from others (layer ranges, batch arithmetic, precision, device, backend, the parsed
data specs) is computed here and nowhere else. Nothing here imports torch.

Batch semantics: `--batch-size` is the global batch of one pipeline pass, over all data-parallel
replicas together, so a step sees the same sequences whatever `--data-group-size` is and layouts
compare step for step. Replica r of D takes rows [r*B/D, (r+1)*B/D) of it and splits them into
`B / D / --micro-batch-size` micro-batches; one optimizer step consumes
`--gradient-accumulate-step` passes, i.e. batch-size x gradient-accumulate-step sequences.
(Upstream's `--batch-size` was per replica: its global batch grew with the data-parallel size.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openchatkit.data.tasks import TaskEntry, parse_task_spec
from openchatkit.errors import UserError
from openchatkit.models.lora import LoraSettings
from openchatkit.models.registry import MODEL_TYPES
from openchatkit.models.shape import ModelShape, split_layers

__all__ = ["ModelShape", "TrainConfig", "read_model_shape", "stage_layer_ranges"]

PRECISIONS = ("fp32", "bf16", "fp16")


def read_model_shape(folder: str | Path) -> ModelShape:
    """Read config.json of a model folder (cheap; no transformers import)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"--model-name {folder}: no config.json there")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--model-name {folder}: unreadable config.json ({err})") from None
    return ModelShape.from_dict(cfg, f"--model-name {folder}")


def stage_layer_ranges(num_layers: int, pp: int, per_stage: int | None) -> list[range]:
    """Global layer indices of each pipeline stage.

    Without --num-layers the layers are split as evenly as possible (earlier stages take one
    more). With it, `per_stage x pp` must equal the model's layers. The one exception is the
    original's 20B recipe (44 layers as 8 stages x 6): when the layers do not divide by
    pp, `per_stage = ceil(num_layers / pp)` is accepted and the last stage holds the remainder
    (7 x 6 + 2). Any other value is a UserError that names the value to use.
    """
    if pp > num_layers:
        raise UserError(
            f"--pipeline-group-size {pp} exceeds the model's {num_layers} layers "
            "(every stage needs at least one)"
        )
    if per_stage is None:
        return split_layers(num_layers, pp)
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


def _at_least(flags: Any, name: str, low: float, note: str = "") -> None:
    value = getattr(flags, name)
    if value < low:
        raise UserError(f"--{name.replace('_', '-')} must be >= {low}{note}, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, checked and derived once (see the module docstring).

    Field names are the flags' names (`--seq-length` -> `seq_length`) except where a flag is
    replaced by what it means: `precision` for --fp16/--bf16, `pp`/`dp` for the group sizes,
    `tasks`/`eval_tasks` for the parsed data specs.
    """

    # model
    model_name: str
    tokenizer_name: str
    model: ModelShape
    load_pretrained_model: bool
    layer_ranges: tuple[range, ...]  # global layer indices of each stage
    # distributed
    pp: int
    dp: int
    pp_mode: str  # gpipe | 1f1b
    device: str  # cpu | cuda
    dp_backend: str  # gloo | nccl
    rank: int | None
    world_size: int | None
    dist_url: str | None
    cuda_id: int | None
    net_interface: str | None
    pg_timeout: float  # seconds
    peer_timeout: float  # seconds, 0 = off
    # data
    task_name: str
    tasks: tuple[TaskEntry, ...]
    evaluation_data: str | None
    eval_tasks: tuple[TaskEntry, ...] | None
    seq_length: int
    batch_size: int  # global sequences per pipeline pass
    micro_batch_size: int
    gradient_accumulate_step: int
    loss_on: str
    reset_position_ids: bool
    seed: int
    strict_data: bool  # a malformed data line is fatal instead of skipped with a warning
    # optimisation
    total_steps: int
    warmup_steps: int
    lr: float
    lr_decay_style: str  # linear | constant (after the warm-up)
    weight_decay: float
    max_grad_norm: float  # 0 = no clipping
    optimizer: str  # adam | 8bit-adam | paged-8bit-adam
    precision: str  # fp32 | bf16 | fp16
    activation_checkpointing: str  # none | layers (recompute each layer in its backward)
    gpu_memory: float | None  # GiB per GPU for the memory check; None: the device's
    lora: LoraSettings | None  # None: full fine-tuning
    load_in_4bit: bool
    initial_loss_scale: float
    loss_scale_window: int
    # checkpoints, evaluation, logs
    checkpoint_path: str
    checkpoint_steps: int
    num_checkpoints: int
    save_timeout: float  # seconds, for the barriers around a checkpoint write
    evaluation_steps: int
    evaluation_num_batches: int
    train_log_backend: str
    project_name: str
    profiling: str
    profile_steps: int
    stop_after_steps: int | None

    # -- derived --------------------------------------------------------------------------------
    @property
    def replica_batch_sequences(self) -> int:
        """Sequences of one pipeline pass on one data-parallel replica."""
        return self.batch_size // self.dp

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per pipeline pass on one replica."""
        return self.replica_batch_sequences // self.micro_batch_size

    @property
    def global_batch_sequences(self) -> int:
        """Sequences of one optimizer step, all replicas and accumulation passes together."""
        return self.batch_size * self.gradient_accumulate_step

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_sequences * self.seq_length

    def summary(self) -> dict[str, Any]:
        """Values derived from the flags, printed at start and stored in meta.json."""
        return {
            "num_microbatches": self.num_microbatches,
            "replica_batch_sequences": self.replica_batch_sequences,
            "global_batch_sequences": self.global_batch_sequences,
            "tokens_per_step": self.tokens_per_step,
            "layers_per_stage": [len(r) for r in self.layer_ranges],
        }

    def flags(self) -> dict[str, Any]:
        """The plain (JSON) values of this config, for meta.json and the experiment tracker."""
        plain = (str, int, float, bool, type(None))
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), plain)
        }
        out["lora"] = dataclasses.asdict(self.lora) if self.lora is not None else None
        return out

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_flags(
        cls,
        flags: Any,
        shape: ModelShape,
        cuda_available: Callable[[], bool],
        check_files: bool = True,
    ) -> TrainConfig:
        """Check the parsed flags (an argparse Namespace) against each other and the model.

        `cuda_available` is called only when --device is not cpu (it imports torch).
        `check_files=False` skips the model folder and data specs (for in-process use:
        `openchatkit.cli.train.config_with_defaults`).
        """
        f = flags
        pp, dp = f.pipeline_group_size, f.data_group_size
        _at_least(f, "pipeline_group_size", 1)
        _at_least(f, "data_group_size", 1)
        if f.fp16 and f.bf16:
            raise UserError("--fp16 and --bf16 exclude each other")
        if f.model_type is not None and MODEL_TYPES[f.model_type] != shape.model_type:
            raise UserError(
                f"--model-type {f.model_type} does not match the model's model_type "
                f"{shape.model_type!r} in {f.model_name}/config.json"
            )
        layer_ranges = stage_layer_ranges(shape.num_layers, pp, f.num_layers)
        if f.embedding_dim is not None and f.embedding_dim != shape.hidden_size:
            raise UserError(
                f"--embedding-dim {f.embedding_dim} does not match the model's hidden size "
                f"{shape.hidden_size}"
            )
        for name in ("seq_length", "batch_size", "micro_batch_size", "gradient_accumulate_step"):
            _at_least(f, name, 1)
        if f.batch_size % dp != 0:
            raise UserError(
                f"--batch-size {f.batch_size} (the global batch) is not divisible by "
                f"--data-group-size {dp}"
            )
        local_batch = f.batch_size // dp
        if local_batch % f.micro_batch_size != 0:
            raise UserError(
                f"--batch-size {f.batch_size} / --data-group-size {dp} = {local_batch} sequences "
                f"per replica, not divisible by --micro-batch-size {f.micro_batch_size}"
            )
        num_micro = local_batch // f.micro_batch_size
        if f.pp_mode == "1f1b" and num_micro < pp:
            raise UserError(
                f"--pp-mode 1f1b needs at least --pipeline-group-size ({pp}) micro-batches, but "
                f"--batch-size / --data-group-size / --micro-batch-size = {num_micro}"
            )
        _at_least(f, "total_steps", 1)
        if not 0 <= f.warmup_steps <= f.total_steps:
            raise UserError(
                f"--warmup-steps must be in [0, --total-steps={f.total_steps}], "
                f"got {f.warmup_steps}"
            )
        if f.lr <= 0:
            raise UserError(f"--lr must be > 0, got {f.lr}")
        for name in ("checkpoint_steps", "num_checkpoints", "evaluation_steps"):
            _at_least(f, name, 0)
        if f.save_timeout <= 0:
            raise UserError(f"--save-timeout must be > 0 seconds, got {f.save_timeout}")
        if f.evaluation_steps > 0 and not f.evaluation_data:
            raise UserError("--evaluation-steps needs --evaluation-data")
        _at_least(f, "peer_timeout", 0, " (0 turns it off)")
        _at_least(f, "max_grad_norm", 0)
        if f.initial_loss_scale <= 0:
            raise UserError(f"--initial-loss-scale must be > 0, got {f.initial_loss_scale}")
        device = f.device or ("cuda" if cuda_available() else "cpu")
        if device == "cuda" and not cuda_available():
            raise UserError("--device cuda, but no CUDA device is visible")
        dp_backend = f.dp_backend or ("nccl" if device == "cuda" else "gloo")
        if dp_backend == "nccl" and device != "cuda":
            raise UserError("--dp-backend nccl needs --device cuda; use --dp-backend gloo on CPU")
        if dp_backend == "gloo" and device == "cuda" and pp > 1:
            raise UserError(
                "--dp-backend gloo cannot send CUDA tensors between pipeline stages; use "
                "--dp-backend nccl with --device cuda"
            )
        if f.gpu_memory is not None and f.gpu_memory <= 0:
            raise UserError(f"--gpu-memory must be > 0 GiB, got {f.gpu_memory}")
        folder = Path(f.model_name)
        if check_files and f.load_pretrained_model and not (folder / "manifest.json").is_file():
            raise UserError(
                f"--model-name {folder}: not a layer-sharded folder (no manifest.json); prepare "
                "it with pretrained/<Model>/prepare.py or tools/convert_from_hf_*.py"
            )
        lora = _lora_settings(f, shape)
        if f.load_in_4bit and lora is None:
            raise UserError("--load-in-4bit (QLoRA) trains adapters: give --lora-r too")
        if f.load_in_4bit:
            from openchatkit.models.quantize import check_4bit_support

            check_4bit_support(device)  # one line where bitsandbytes cannot do NF4
        # fp16 is allowed on CPU (kernels exist, just slow): tests use it for the loss scale.
        # Fields named as their flag take the flag's value; the rest are derived here.
        same = {
            fld.name: getattr(f, fld.name)
            for fld in dataclasses.fields(cls)
            if hasattr(f, fld.name)
        }
        derived = dict(
            tokenizer_name=f.tokenizer_name or f.model_name,
            model=shape,
            layer_ranges=tuple(layer_ranges),
            pp=pp,
            dp=dp,
            device=device,
            dp_backend=dp_backend,
            tasks=tuple(parse_task_spec(f.task_name)) if check_files else (),
            eval_tasks=(
                tuple(parse_task_spec(f.evaluation_data, "--evaluation-data"))
                if check_files and f.evaluation_data
                else None
            ),
            precision="fp16" if f.fp16 else "bf16" if f.bf16 else "fp32",
            activation_checkpointing=f.activation_checkpointing
            or ("layers" if device == "cuda" else "none"),
            lora=lora,
        )
        return cls(**(same | derived))


def _lora_settings(f: Any, shape: ModelShape) -> LoraSettings | None:
    """The --lora-* flags as LoraSettings; None when --lora-r is 0."""
    if f.lora_r < 0:
        raise UserError(f"--lora-r must be >= 0 (0: full fine-tuning), got {f.lora_r}")
    if f.lora_r == 0:
        return None
    if not 0 <= f.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {f.lora_dropout}")
    if f.lora_alpha is not None and f.lora_alpha <= 0:
        raise UserError(f"--lora-alpha must be > 0, got {f.lora_alpha}")
    targets = shape.arch.lora_targets
    if f.lora_target_modules is not None:
        targets = tuple(t.strip() for t in f.lora_target_modules.split(",") if t.strip())
        if not targets:
            raise UserError("--lora-target-modules is empty")
    return LoraSettings(
        r=f.lora_r,
        alpha=float(f.lora_alpha if f.lora_alpha is not None else 2 * f.lora_r),
        dropout=f.lora_dropout,
        target_modules=targets,
        bias=f.lora_bias,
    )
