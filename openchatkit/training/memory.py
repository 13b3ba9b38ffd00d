"""Memory planner: the bytes each pipeline stage needs on its GPU, before anything is allocated.

Pure arithmetic over the model's config and the trainer's flags (no torch import). Per stage:

- state: parameters; weights (model dtype), gradients (fp32 in every precision: the trainer's
  flat buckets, openchatkit/training/grad_buckets.py, are fp32 in fp16/bf16 runs, where each
  micro-batch's half-precision gradient is added into them, and the fp32 masters read them in
  place), fp32 master copies (fp16/bf16 runs), optimizer state (AdamW: 8 bytes per parameter;
  bitsandbytes 8-bit AdamW: 2, small tensors 8);
- activations: the bytes one micro-batch keeps for its backward on this stage, times the number
  of micro-batches in flight (GPipe: all of them; 1F1B: min(pp - stage, micro-batches); pp = 1:
  one), plus the last stage's loss buffers per micro-batch in flight (the LM head runs inside
  the loss, fused with the cross-entropy, and is recomputed under GPipe:
  openchatkit/training/loss.py);
- communication: torch.distributed.pipelining allocates a receive buffer per micro-batch, for
  activations (every stage but the first) and for their gradients (every stage but the last);
  the data-parallel all-reduce runs in place on the gradients' own flat buckets;
- a transient: the backward working set of one layer (plus its recomputed activations under
  checkpointing, and one parameter's half-precision gradient) or of the loss;
- a fixed runtime allowance (CUDA context, cuBLAS workspaces, NCCL, allocator slack).

Under LoRA only the adapters have gradients, masters and optimizer state (the base may be NF4
with --load-in-4bit); activations are counted as for full fine-tuning plus the adapters' own,
an upper bound. The peak is the larger of two phases: pipeline (state with the fp32 gradient
buckets + activations + buffers) and optimizer step (state with the same buckets, which the
masters read with no conversion).

Activation bytes per token per layer were measured on CPU with `memory_probe.LiveBytes` (a
dispatch-mode allocator count, equal to what saved-tensor hooks see) on tiny transformers layers
of each architecture, over a grid of hidden / intermediate / heads / kv-heads / rotary / seq, and
fitted exactly (zero residual) by each architecture's formulas (`Architecture.
layer_activation_bytes` and friends in `openchatkit/models/<arch>.py`; this module holds no
per-architecture knowledge). SDPA attention keeps q, k, v, the output and an fp32 log-sum-exp
per head (no S x S term); eager attention keeps fp32 scores and probabilities (heads x S per
token). The MLP's activation counts: transformers' `gelu_fast` keeps six MLP-width tensors more
than torch's GELU (the 20B recipe's base: 84 bytes per token per hidden unit in half precision,
36 with plain GELU; 1.06 GB per layer per 2048-token micro-batch). With `activation_checkpointing="layers"` a layer keeps only its input (hidden x dtype bytes per
token) and recomputes the rest during its backward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError
from openchatkit.models.published import published_config, published_names
from openchatkit.models.shape import ModelShape, split_layers
from openchatkit.training.optim import EIGHT_BIT

if TYPE_CHECKING:
    from openchatkit.models.lora import LoraSettings

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN workspaces, NCCL channels and allocator fragmentation: not visible
# to torch's allocator statistics but taken from the card (an allowance, not a measurement).
RUNTIME_BYTES = 2 * GIB
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
# bitsandbytes NF4 with double quantisation (QLoRA's): 4 bits per weight, an 8-bit absmax per
# 64-weight block, and an fp32 absmax per 256 of those blocks: 0.5 + 1/64 + 4/(64*256) bytes.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SCHEDULES = ("gpipe", "1f1b")
CHECKPOINTING = ("none", "layers")


@dataclass(frozen=True)
class TrainSetup:
    """The trainer's settings that decide memory: the fields of `TrainConfig`
    (openchatkit/training/config.py; flags in openchatkit/cli/train.py) under the same names,
    so `from_config` copies them."""

    layer_ranges: tuple[range, ...]
    micro_batch_size: int
    seq_length: int
    num_microbatches: int  # per replica and pipeline pass
    pp_mode: str = "gpipe"  # gpipe | 1f1b
    precision: str = "fp32"  # fp32 | bf16 | fp16
    optimizer: str = "adam"  # adam | 8bit-adam | paged-8bit-adam
    activation_checkpointing: str = "none"  # none | layers
    dp: int = 1
    lora: LoraSettings | None = None  # None: full fine-tuning
    load_in_4bit: bool = False  # QLoRA: every layer linear in NF4

    @classmethod
    def from_config(cls, config: Any) -> TrainSetup:
        """From a `TrainConfig` (or anything with these attributes)."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        return cls(**values | {"layer_ranges": tuple(config.layer_ranges)})

    @property
    def pp(self) -> int:
        return len(self.layer_ranges)

    @property
    def lora_r(self) -> int:
        return self.lora.r if self.lora is not None else 0


@dataclass(frozen=True)
class StageMemory:
    """One stage's bytes (see the module docstring); `peak` includes RUNTIME_BYTES."""

    stage: int
    layers: range
    params: int
    weights: int
    grads: int  # the fp32 gradient buckets (grad_buckets.py), in every precision
    master: int
    optimizer: int
    act_per_microbatch: int  # layers (+ embedding output on the first stage)
    in_flight: int
    activations: int  # act_per_microbatch x in_flight
    logits: int  # last stage: logits + loss buffers of the micro-batches in flight
    comm: int  # pipeline receive buffers
    transient: int
    pipeline_peak: int
    step_peak: int
    peak: int = field(default=0)


def layer_activation_bytes(shape: ModelShape, precision: str, seq: int) -> float:
    """Bytes one layer keeps per token for its backward (no checkpointing): the architecture's
    formula (`Architecture.layer_activation_bytes`, exact fits of CPU measurements; see the
    module docstring). fp32 and half differ where a layer upcasts to fp32 (norms, softmax)."""
    return shape.arch.layer_activation_bytes(shape, ELEMENT_BYTES[precision], seq)


def stage_tokens_bytes(shape: ModelShape, setup: TrainSetup, stage: int) -> dict[str, float]:
    """Per-token bytes of one micro-batch on `stage`: what it keeps, and the loss buffers."""
    arch = shape.arch
    e = ELEMENT_BYTES[setup.precision]
    h = shape.hidden_size
    layers = len(setup.layer_ranges[stage])
    first, last = stage == 0, stage == setup.pp - 1
    recomputed = setup.activation_checkpointing == "layers"
    full_layer = layer_activation_bytes(shape, setup.precision, setup.seq_length)
    full_layer += _lora_activation_bytes(shape, setup)
    # Each layer's output (the next one's input) is the only thing a recomputed layer keeps.
    per_layer = h * e if recomputed else full_layer
    kept = layers * per_layer
    kept += 8  # position ids (int64), passed to every stage
    # What the stage's layers share (rotary tables, a mask), per the architecture.
    kept += arch.stage_activation_bytes(shape, e, setup.seq_length, recomputed)
    if first:
        kept += h * e + 8  # embedding output (layer 0's input) and the token ids
    logits, loss = 0.0, 0.0
    if last:
        # The LM head runs inside the loss, fused with the cross-entropy
        # (openchatkit/training/loss.py): it keeps the fp32 unnormalised softmax (4 V) and
        # per-row sums, targets and mask (16). Half precision adds the model-dtype logits before
        # their fp32 copy in the forward, and the model-dtype logits gradient in the backward
        # (e V); in fp32 the backward only makes (token, hidden) products.
        buffers = shape.vocab_size * 4 + 16
        working = shape.vocab_size * e if e == 2 else 3 * h * 4
        if head_recomputed(setup):
            # A micro-batch keeps its hidden state (counted above) and labels; the buffers
            # exist for one micro-batch at a time, in its forward and again in its backward.
            logits = 16
            loss = buffers + working
        else:
            # The final norm's output (kept by the fused loss as its input) and what the norm
            # keeps, per the architecture.
            kept += arch.final_norm_bytes(shape, e)
            logits = buffers
            loss = working
    # A layer's backward: its recomputed activations (checkpointing) plus its working set.
    backward = (full_layer if recomputed else 0.0) + backward_working_bytes(shape, e)
    if last and not head_recomputed(setup):
        # The layers' backward comes after the loss's, which has released this micro-batch's
        # loss buffers (counted in `logits`): only the excess is a transient (the 32K recipe's
        # last stage: 3.9 GiB of fp32 softmax gone before a 7.3 GiB layer backward).
        backward = max(0.0, backward - logits)
    return {"kept": kept, "logits": logits, "backward": backward, "loss": loss}


def backward_working_bytes(shape: ModelShape, e: int) -> float:
    """Per token, the most a layer's backward holds beyond what the layer keeps: the larger of
    the MLP's input gradients (1.25 MLP-width tensors) and attention's (q, k, v and output
    gradients, 4 h model-dtype bytes, plus flash attention's fp32 dq accumulator, 4 h).
    Measured under FakeTensorMode on one full-size layer of each shipped architecture (with the
    engine's per-parameter gradient release): 20B, GPT-JT-6B, RedPajama-3B at 2048 tokens and
    Llama-2-7B at 2048 and 32768, within 10 % with the weight gradient of `plan_memory` (a
    recomputed layer adds its full activations: 1.23-1.50x a layer's bytes in all, where the
    earlier 2x over-planned the 32K recipe by up to 31 %)."""
    h, i = shape.hidden_size, shape.intermediate_size
    return max(1.25 * i * e, (4 * e + 4) * h)


def head_recomputed(setup: TrainSetup) -> bool:
    """The trainer recomputes the head and loss in the backward under GPipe with pp > 1
    (openchatkit/training/engine.py), where the last stage holds every micro-batch."""
    return setup.pp > 1 and setup.pp_mode == "gpipe"


def in_flight(schedule: str, stage: int, pp: int, num_microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at once."""
    if pp == 1:
        return 1  # forward, loss and backward per micro-batch
    if schedule == "gpipe":
        return num_microbatches
    return min(pp - stage, num_microbatches)


def plan_memory(shape: ModelShape, setup: TrainSetup) -> list[StageMemory]:
    """The memory of every stage of one replica (all replicas of a stage are equal)."""
    if setup.pp_mode not in SCHEDULES:
        raise ValueError(f"schedule {setup.pp_mode!r}: expected one of {SCHEDULES}")
    if setup.activation_checkpointing not in CHECKPOINTING:
        raise ValueError(
            f"checkpointing {setup.activation_checkpointing!r}: expected {CHECKPOINTING}"
        )
    e = ELEMENT_BYTES[setup.precision]
    tokens = setup.micro_batch_size * setup.seq_length
    pp, m = setup.pp, setup.num_microbatches
    head_vectors = shape.arch.head_vectors(shape)
    out = []
    for s, layers in enumerate(setup.layer_ranges):
        first, last = s == 0, s == pp - 1
        params = len(layers) * shape.layer_params()
        # Parameters in tensors below bitsandbytes' 8-bit threshold (norms, biases).
        small = len(layers) * _small(shape.layer_vectors())
        if first:
            params += shape.embed_params()
        if last:
            # A tied LM head is the embedding itself on one stage, its own copy otherwise.
            tied_here = shape.tie_word_embeddings and first
            params += shape.head_params() - (shape.embed_params() if tied_here else 0)
            small += _small(head_vectors)
        weights = params * e
        trainable = params
        if setup.lora is not None:
            # Frozen base; only the adapters (in the model dtype, as peft casts them) train.
            small = 0  # adapter matrices are above the 8-bit size
            trainable = len(layers) * sum(
                setup.lora.r * (a + b) for a, b in _lora_targets(shape, setup)
            )
            if setup.load_in_4bit:
                # Every linear of the layers in NF4 (see NF4_BYTES_PER_WEIGHT).
                linear = len(layers) * sum(a * b for a, b in shape.linear_shapes().values())
                weights -= linear * e - math.ceil(linear * NF4_BYTES_PER_WEIGHT)
            weights += trainable * e
            params += trainable
        # fp32 buckets in every precision: the model's own fp32 gradients, or the sums of the
        # half-precision ones that the masters read (openchatkit/training/grad_buckets.py).
        grads = trainable * 4
        master = trainable * 4 if e != 4 else 0
        if setup.optimizer in EIGHT_BIT:
            # Two uint8 states and two fp32 absmax per 256-element block; fp32 states below
            # the 8-bit size. Paged state is counted as resident: the driver moves it to the
            # host only under pressure, so this is an upper bound for the paged variant.
            optimizer = math.ceil((2 + 8 / 256) * (trainable - small)) + 8 * small
        else:
            optimizer = 8 * trainable
        per_token = stage_tokens_bytes(shape, setup, s)
        n = in_flight(setup.pp_mode, s, pp, m)
        act = math.ceil(per_token["kept"] * tokens)
        logits = math.ceil(per_token["logits"] * tokens) * n
        comm = 0
        if pp > 1:
            buffer = tokens * shape.hidden_size * e
            comm = m * buffer * ((0 if first else 1) + (0 if last else 1))
        # Half-precision runs add each micro-batch's gradient of one parameter at a time into
        # the fp32 buckets (the largest: one linear's weight); fp32 gradients are bucket views,
        # and LoRA's frozen base has none.
        grad_transient = 0
        if e != 4 and setup.lora is None:
            grad_transient = e * max(a * b for a, b in shape.linear_shapes().values())
        transient = math.ceil(
            max(per_token["backward"] * tokens + grad_transient, per_token["loss"] * tokens)
        )
        state = weights + master + optimizer
        pipeline = state + grads + act * n + logits + comm + transient
        # The optimizer step reads the same fp32 buckets (no conversion, no second copy).
        step = state + grads + comm
        peak = max(pipeline, step) + RUNTIME_BYTES
        out.append(
            StageMemory(
                stage=s,
                layers=layers,
                params=params,
                weights=weights,
                grads=grads,
                master=master,
                optimizer=optimizer,
                act_per_microbatch=act,
                in_flight=n,
                activations=act * n,
                logits=logits,
                comm=comm,
                transient=transient,
                pipeline_peak=pipeline,
                step_peak=step,
                peak=peak,
            )
        )
    return out


def _lora_targets(shape: ModelShape, setup: TrainSetup) -> list[tuple[int, int]]:
    """(in, out) of each adapted module in one layer (peft matches a target by name suffix)."""
    if setup.lora is None:
        return []
    shapes = shape.linear_shapes()
    names = [t.rsplit(".", 1)[-1] for t in setup.lora.target_modules]
    return [shapes[name] for name in names if name in shapes]


def _lora_activation_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Per token and layer, what the adapters add: A's output (r) and, with dropout, the
    dropped input and its mask (a bool mask on CUDA, one of the input's dtype on CPU). The base
    layer's own bytes are counted as in full fine-tuning: an upper bound, since a frozen linear
    keeps no input for a weight gradient (measured on tiny layers: 1.2-1.5x what LoRA keeps)."""
    e = ELEMENT_BYTES[setup.precision]
    total = 0.0
    for fan_in, _ in _lora_targets(shape, setup):
        total += setup.lora.r * e + (fan_in * 2 * e if setup.lora.dropout > 0 else 0)
    return total


def _small(sizes: list[int]) -> int:
    """Parameters held in tensors below bitsandbytes' 8-bit size."""
    return sum(n for n in sizes if n < BNB_MIN_8BIT_SIZE)


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def format_table(plans: Sequence[StageMemory], gpu_bytes: float | None = None) -> str:
    """A fixed-width table, one row per stage, sizes in GiB."""
    head = (
        "stage  layers   params   weights  grads  master  optim  act/mb x n      acts  "
        "logits   comm  trans   peak"
    )
    rows = [head]
    for p in plans:
        layers = f"{p.layers.start}-{p.layers.stop - 1}"
        rows.append(
            f"{p.stage:>5}  {layers:>6}  {p.params / 1e9:>6.2f}B  {gib(p.weights):>7}  "
            f"{gib(p.grads):>5}  {gib(p.master):>6}  {gib(p.optimizer):>5}  "
            f"{gib(p.act_per_microbatch):>6} x {p.in_flight:<4}  {gib(p.activations):>6}  "
            f"{gib(p.logits):>6}  {gib(p.comm):>5}  {gib(p.transient):>5}  {gib(p.peak):>5}"
        )
    worst = max(plans, key=lambda p: p.peak)
    tail = f"peak {gib(worst.peak)} GiB on stage {worst.stage} (incl. {gib(RUNTIME_BYTES)} GiB runtime)"
    if gpu_bytes:
        verdict = "fits" if worst.peak <= gpu_bytes else "does NOT fit"
        tail += f"; {verdict} in {gib(gpu_bytes)} GiB"
    return "\n".join(rows + [tail])


# Changes a refusal may suggest, cheapest first: (flag text, changed setup or None).
def _fixes(setup: TrainSetup, num_layers: int) -> list[tuple[str, TrainSetup]]:
    out = []
    ckpt = replace(setup, activation_checkpointing="layers")
    if setup.activation_checkpointing == "none":
        out.append(("--activation-checkpointing layers", ckpt))
    one_f = setup.pp > 1 and setup.pp_mode == "gpipe" and setup.num_microbatches >= setup.pp
    if one_f:
        out.append(("--pp-mode 1f1b", replace(setup, pp_mode="1f1b")))
        if setup.activation_checkpointing == "none":
            out.append(
                ("--pp-mode 1f1b --activation-checkpointing layers", replace(ckpt, pp_mode="1f1b"))
            )
    mb = setup.micro_batch_size
    while mb > 1:
        mb //= 2
        factor = setup.micro_batch_size // mb
        smaller = replace(
            setup, micro_batch_size=mb, num_microbatches=setup.num_microbatches * factor
        )
        out.append((f"--micro-batch-size {mb}", smaller))
        if setup.activation_checkpointing == "none":
            out.append((f"--micro-batch-size {mb} --activation-checkpointing layers",
                        replace(smaller, activation_checkpointing="layers")))  # fmt: skip
    pp = setup.pp * 2
    while pp <= num_layers and pp <= 64:
        ranges = tuple(split_layers(num_layers, pp))
        if setup.pp_mode != "1f1b" or setup.num_microbatches >= pp:
            out.append(
                (f"--pipeline-group-size {pp} (more GPUs)", replace(setup, layer_ranges=ranges))
            )
        pp *= 2
    return out


def refusal(shape: ModelShape, setup: TrainSetup, gpu_bytes: float) -> str | None:
    """None when every stage fits `gpu_bytes`; else one line naming the worst stage, the
    shortfall and the cheapest change that fits."""
    plans = plan_memory(shape, setup)
    worst = max(plans, key=lambda p: p.peak)
    if worst.peak <= gpu_bytes:
        return None
    line = (
        f"stage {worst.stage} (layers {worst.layers.start}-{worst.layers.stop - 1}) needs "
        f"{gib(worst.peak)} GiB of {gib(gpu_bytes)} GiB per GPU, {gib(worst.peak - gpu_bytes)} GiB "
        "short"
    )
    for flags, candidate in _fixes(setup, shape.num_layers):
        peak = max(p.peak for p in plan_memory(shape, candidate))
        if peak <= gpu_bytes:
            return f"{line}; cheapest fix: {flags} (peak {gib(peak)} GiB)"
    other = "" if setup.optimizer in EIGHT_BIT else " or --optimizer 8bit-adam"
    return f"{line}; no single change fits: use more GPUs, a shorter --seq-length{other}"


def check_fits(
    shape: ModelShape, setup: TrainSetup, gpu_bytes: float, error: Callable[[str], Exception]
) -> list[StageMemory]:
    """Plan, and raise `error(one line)` when a stage does not fit."""
    message = refusal(shape, setup, gpu_bytes)
    if message is not None:
        raise error(f"out of GPU memory before starting: {message}")
    return plan_memory(shape, setup)


# -- from the trainer's flags ------------------------------------------------------------------
def read_shape(model_name: str | Path) -> tuple[ModelShape, str]:
    """The model's shape from `<model_name>/config.json`, else from the published configs by
    folder name (openchatkit/models/published.py: a plan needs no download). Returns (shape,
    where it came from)."""
    folder = Path(model_name)
    path = folder / "config.json"
    where = f"--model-name {folder}"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{where}: unusable config.json ({err})") from None
        return ModelShape.from_dict(cfg, where), str(path)
    known = published_config(folder.name)
    if known is None:
        raise UserError(
            f"{where}: no config.json there, and {folder.name!r} is not one of "
            f"the shipped models ({', '.join(published_names())})"
        )
    return ModelShape.from_dict(known, where), f"the published config of {folder.name}"


def check_before_training(config: Any, device_bytes: Callable[[int], int]) -> None:
    """The trainer's start-up check (CUDA only, before any allocation): refuse in one line
    when a stage will not fit `--gpu-memory` GiB (default: the device's memory, from
    `device_bytes(cuda_id)`)."""
    if config.device != "cuda":
        return
    shape, _ = read_shape(config.model_name)
    if config.gpu_memory is not None:
        gpu = config.gpu_memory * GIB
    else:
        gpu = device_bytes(config.cuda_id if config.cuda_id is not None else 0)
    check_fits(shape, TrainSetup.from_config(config), gpu, UserError)
