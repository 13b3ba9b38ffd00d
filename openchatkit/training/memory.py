"""Memory planner: the bytes each pipeline stage needs on its GPU, before anything is allocated.

Pure arithmetic over the model's config and the trainer's flags (no torch import). Per stage:

- state: parameters; weights (model dtype), gradients (model dtype while the pipeline runs, fp32
  on the masters during the optimizer step), fp32 master copies (fp16/bf16 runs), optimizer
  state (AdamW: 8 bytes per parameter; bitsandbytes 8-bit AdamW: 2, small tensors 8);
- activations: the bytes one micro-batch keeps for its backward on this stage, times the number
  of micro-batches in flight (GPipe: all of them; 1F1B: min(pp - stage, micro-batches); pp = 1:
  one), plus the last stage's loss buffers per micro-batch in flight (the LM head runs inside
  the loss, fused with the cross-entropy, and is recomputed under GPipe:
  openchatkit/training/loss.py);
- communication: torch.distributed.pipelining allocates a receive buffer per micro-batch, for
  activations (every stage but the first) and for their gradients (every stage but the last);
  the data-parallel all-reduce runs in place on the gradients' own flat buckets;
- a transient: the backward working set of one layer (two with recomputation) or of the loss;
- a fixed runtime allowance (CUDA context, cuBLAS workspaces, NCCL, allocator slack).

Under LoRA only the adapters have gradients, masters and optimizer state (the base may be NF4
with --load-in-4bit); activations are counted as for full fine-tuning plus the adapters' own,
an upper bound. The peak is the larger of two phases: pipeline (state with model-dtype grads + activations +
buffers) and optimizer step (state with fp32 grads + one model-dtype bucket being converted).

Activation bytes per token per layer were measured on CPU with `memory_probe.LiveBytes` (a
dispatch-mode allocator count, equal to what saved-tensor hooks see) on tiny transformers layers
of each architecture, over a grid of hidden / intermediate / heads / kv-heads / rotary / seq, and
fitted exactly (zero residual) by the formulas in `layer_activation_bytes`. SDPA attention keeps
q, k, v, the output and an fp32 log-sum-exp per head (no S x S term); GPT-J runs eager attention,
which keeps fp32 scores and probabilities (heads x S per token). GPT-NeoX-20B in half precision:
36 bytes per token per hidden unit, 453 MB per layer per 2048-token micro-batch. With
`activation_checkpointing="layers"` a layer keeps only its input (hidden x dtype bytes per token)
and recomputes the rest during its backward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from openchatkit.errors import UserError

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN workspaces, NCCL channels and allocator fragmentation: not visible
# to torch's allocator statistics but taken from the card (an allowance, not a measurement).
RUNTIME_BYTES = 2 * GIB
BUCKET_NUMEL = 25_000_000  # openchatkit.training.engine.BUCKET_NUMEL
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SCHEDULES = ("gpipe", "1f1b")
CHECKPOINTING = ("none", "layers")
EIGHT_BIT = ("8bit-adam", "paged-8bit-adam")  # bitsandbytes' AdamW8bit state, paged or not

# Published configs of the shipped base models (config.json fields), so a plan needs no download.
# Keyed by the folder name `pretrained/<Model>/prepare.py` writes.
KNOWN_CONFIGS: dict[str, dict] = {
    "EleutherAI_gpt-neox-20b": dict(
        model_type="gpt_neox", hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
        intermediate_size=24576, vocab_size=50432, rotary_pct=0.25, tie_word_embeddings=False,
    ),
    "EleutherAI_pythia-6.9b-deduped": dict(
        model_type="gpt_neox", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=16384, vocab_size=50432, rotary_pct=0.25, tie_word_embeddings=False,
    ),
    "togethercomputer_RedPajama-INCITE-Base-3B-v1": dict(
        model_type="gpt_neox", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=10240, vocab_size=50432, rotary_pct=1.0, tie_word_embeddings=False,
    ),
    "togethercomputer_RedPajama-INCITE-7B-Base": dict(
        model_type="gpt_neox", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=16384, vocab_size=50432, rotary_pct=1.0, tie_word_embeddings=False,
    ),
    "togethercomputer_LLaMA-2-7B-32K": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "EleutherAI_gpt-j-6b": dict(
        model_type="gptj", n_embd=4096, n_layer=28, n_head=16, n_inner=None, rotary_dim=64,
        vocab_size=50400, tie_word_embeddings=False,
    ),
}  # fmt: skip
# Fine-tuned variants have their base's shape.
KNOWN_CONFIGS["togethercomputer_RedPajama-INCITE-Chat-3B-v1"] = KNOWN_CONFIGS[
    "togethercomputer_RedPajama-INCITE-Base-3B-v1"
]
KNOWN_CONFIGS["togethercomputer_GPT-JT-6B-v1"] = KNOWN_CONFIGS["EleutherAI_gpt-j-6b"]


@dataclass(frozen=True)
class ModelDims:
    """What the planner needs from a config.json (HF names differ per architecture)."""

    model_type: str  # gpt_neox | gptj | llama
    hidden: int
    num_layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    rotary_dim: int  # rotated dimensions per head
    attention: str  # sdpa | eager

    @classmethod
    def from_config(cls, cfg: dict) -> ModelDims:
        kind = cfg.get("model_type")
        hidden = int(cfg.get("hidden_size", cfg.get("n_embd", 0)))
        heads = int(cfg.get("num_attention_heads", cfg.get("n_head", 0)))
        head_dim = hidden // max(heads, 1)
        if kind == "gpt_neox":
            rotary, inter = int(head_dim * cfg.get("rotary_pct", 0.25)), cfg["intermediate_size"]
        elif kind == "gptj":
            rotary, inter = int(cfg.get("rotary_dim") or head_dim), cfg.get("n_inner") or 4 * hidden
        elif kind == "llama":
            rotary, inter = int(cfg.get("head_dim") or head_dim), cfg["intermediate_size"]
        else:
            raise ValueError(f"model_type {kind!r} is not one of gpt_neox, gptj, llama")
        return cls(
            model_type=kind,
            hidden=hidden,
            num_layers=int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0))),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(inter),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", kind != "gpt_neox")),
            rotary_dim=rotary,
            attention="eager" if kind == "gptj" else "sdpa",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        if self.model_type == "gpt_neox":  # 2 LayerNorms, fused QKV + dense, MLP, all biased
            return 4 * h * h + 2 * h * i + 9 * h + i
        if self.model_type == "gptj":  # 1 LayerNorm, unbiased q/k/v/out, biased MLP
            return 4 * h * h + 2 * h * i + 3 * h + i
        kv = self.kv_heads * self.head_dim  # llama: 2 RMSNorms, q/o, GQA k/v, gated MLP
        return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        norm = self.hidden if self.model_type == "llama" else 2 * self.hidden
        bias = self.vocab if self.model_type == "gptj" else 0
        return norm + self.vocab * self.hidden + bias


@dataclass(frozen=True)
class TrainSetup:
    """The trainer's flags that decide memory (see openchatkit/training/args.py)."""

    layer_ranges: tuple[range, ...]
    micro_batch_size: int
    seq_length: int
    num_microbatches: int  # per replica and pipeline pass
    schedule: str = "gpipe"  # gpipe | 1f1b
    precision: str = "fp32"  # fp32 | bf16 | fp16
    optimizer: str = "adam"  # adam | 8bit-adam | paged-8bit-adam
    checkpointing: str = "none"  # none | layers
    dp: int = 1
    # LoRA (openchatkit/models/lora.py): r = 0 is full fine-tuning.
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0
    load_in_4bit: bool = False  # QLoRA: every layer linear in NF4

    @property
    def pp(self) -> int:
        return len(self.layer_ranges)


@dataclass(frozen=True)
class StageMemory:
    """One stage's bytes (see the module docstring); `peak` includes RUNTIME_BYTES."""

    stage: int
    layers: range
    params: int
    weights: int
    grads: int  # model-dtype gradients while the pipeline runs
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


def layer_activation_bytes(dims: ModelDims, precision: str, seq: int) -> float:
    """Bytes one layer keeps per token for its backward (no checkpointing).

    Exact fits of CPU measurements (see the module docstring); `e` is the model dtype's size.
    fp32 and half differ where the layer upcasts to fp32 (norms, softmax) whatever the dtype.
    """
    h, i, heads, e = dims.hidden, dims.intermediate, dims.heads, ELEMENT_BYTES[precision]
    half = e == 2
    if dims.model_type == "gpt_neox":
        # LN out, fused qkv, rotated q and k, attention out + its transpose, LN out, residual
        # out (10 h); MLP in and GELU out (2 i); fp32 log-sum-exp; LN statistics.
        return 10 * h * e + 2 * i * e + 4 * heads + 4 * e
    if dims.model_type == "llama":
        kv = dims.kv_heads * dims.head_dim
        # HF's two RMSNorms keep 4 h fp32 bytes each: in half precision the fp32 copy of
        # their input, in fp32 the normalised x * r (the input itself is kept anyway).
        # Besides: 6 h model-dtype tensors; gate, SiLU, up and their product (4 i); GQA k/v
        # (2 kv).
        norms = 8 * h
        return 6 * h * e + norms + 4 * i * e + 2 * kv * e + 4 * heads + 8
    # gptj, eager attention: fp32 scores and probabilities, (heads, seq) per token.
    if half:
        return 16 * h + 10 * i + 8 * dims.rotary_dim + 6 * heads * seq + 4
    return 24 * h + 20 * i + 16 * dims.rotary_dim + 4 * heads * seq + 8


def stage_tokens_bytes(dims: ModelDims, setup: TrainSetup, stage: int) -> dict[str, float]:
    """Per-token bytes of one micro-batch on `stage`: what it keeps, and the loss buffers."""
    e = ELEMENT_BYTES[setup.precision]
    h = dims.hidden
    layers = len(setup.layer_ranges[stage])
    first, last = stage == 0, stage == setup.pp - 1
    full_layer = layer_activation_bytes(dims, setup.precision, setup.seq_length)
    # Each layer's output (the next one's input) is the only thing a recomputed layer keeps.
    full_layer += _lora_activation_bytes(dims, setup)
    per_layer = h * e if setup.checkpointing == "layers" else full_layer
    kept = layers * per_layer
    kept += 8  # position ids (int64), passed to every stage
    if dims.model_type != "gptj":
        # cos/sin tables, (seq, rotary) each, shared by the stage's layers; Llama also keeps
        # the fp32 originals of its half-precision copies unless the layers are recomputed.
        kept += 2 * dims.rotary_dim * e
        if dims.model_type == "llama" and e == 2 and setup.checkpointing == "none":
            kept += 4 * dims.rotary_dim
    if first:
        kept += h * e + 8  # embedding output (layer 0's input) and the token ids
    if dims.attention == "eager" and setup.checkpointing == "layers":
        # The additive causal mask, (seq, seq) per sequence, is an input of every recomputed
        # layer and lives until the last of them has run its backward.
        kept += setup.seq_length * e
    logits, loss = 0.0, 0.0
    if last:
        # The LM head runs inside the loss, fused with the cross-entropy
        # (openchatkit/training/loss.py): it keeps the fp32 unnormalised softmax (4 V) and
        # per-row sums, targets and mask (16). Half precision adds the model-dtype logits before
        # their fp32 copy in the forward, and the model-dtype logits gradient in the backward
        # (e V); in fp32 the backward only makes (token, hidden) products.
        buffers = dims.vocab * 4 + 16
        working = dims.vocab * e if e == 2 else 3 * h * 4
        if head_recomputed(setup):
            # A micro-batch keeps its hidden state (counted above) and labels; the buffers
            # exist for one micro-batch at a time, in its forward and again in its backward.
            logits = 16
            loss = buffers + working
        else:
            # The final norm's output (kept by the fused loss as its input) and what the norm
            # keeps: HF's RMSNorm works in fp32 (measured: 8 h + 4, in bf16 and in fp32).
            if dims.model_type == "llama":
                kept += 8 * h + 4
            else:
                kept += h * e + 8
            logits = buffers
            loss = working
    backward = full_layer * (2 if setup.checkpointing == "layers" else 1)
    return {"kept": kept, "logits": logits, "transient": max(backward, loss)}


def head_recomputed(setup: TrainSetup) -> bool:
    """The trainer recomputes the head and loss in the backward under GPipe with pp > 1
    (openchatkit/training/engine.py), where the last stage holds every micro-batch."""
    return setup.pp > 1 and setup.schedule == "gpipe"


def in_flight(schedule: str, stage: int, pp: int, num_microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at once."""
    if pp == 1:
        return 1  # forward, loss and backward per micro-batch
    if schedule == "gpipe":
        return num_microbatches
    return min(pp - stage, num_microbatches)


def plan_memory(dims: ModelDims, setup: TrainSetup) -> list[StageMemory]:
    """The memory of every stage of one replica (all replicas of a stage are equal)."""
    if setup.schedule not in SCHEDULES:
        raise ValueError(f"schedule {setup.schedule!r}: expected one of {SCHEDULES}")
    if setup.checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing {setup.checkpointing!r}: expected {CHECKPOINTING}")
    e = ELEMENT_BYTES[setup.precision]
    tokens = setup.micro_batch_size * setup.seq_length
    pp, m = setup.pp, setup.num_microbatches
    out = []
    for s, layers in enumerate(setup.layer_ranges):
        first, last = s == 0, s == pp - 1
        params = len(layers) * dims.layer_params()
        small = 0  # parameters in tensors below bitsandbytes' 8-bit threshold
        small += len(layers) * _small_layer_params(dims)
        if first:
            params += dims.embed_params()
        if last:
            # A tied LM head is the embedding itself on one stage, its own copy otherwise.
            params += dims.head_params() - (dims.embed_params() if dims.tied and first else 0)
            small += dims.head_params() - dims.vocab * dims.hidden
        weights = params * e
        trainable = params
        if setup.lora_r > 0:
            # Frozen base; only the adapters (in the model dtype, as peft casts them) train.
            small = 0  # adapter matrices are above the 8-bit size
            trainable = len(layers) * sum(
                setup.lora_r * (a + b) for a, b in _lora_targets(dims, setup)
            )
            if setup.load_in_4bit:
                # NF4: half a byte per weight and an fp32 absmax per 64 of the layers' linears.
                linear = len(layers) * sum(a * b for a, b in linear_shapes(dims).values())
                weights -= linear * e - math.ceil(linear * (0.5 + 4 / 64))
            weights += trainable * e
            params += trainable
        grads = trainable * e
        master = trainable * 4 if e != 4 else 0
        if setup.optimizer in EIGHT_BIT:
            # Two uint8 states and two fp32 absmax per 256-element block; fp32 states below
            # the 8-bit size. Paged state is counted as resident: the driver moves it to the
            # host only under pressure, so this is an upper bound for the paged variant.
            optimizer = math.ceil((2 + 8 / 256) * (trainable - small)) + 8 * small
        else:
            optimizer = 8 * trainable
        per_token = stage_tokens_bytes(dims, setup, s)
        n = in_flight(setup.schedule, s, pp, m)
        act = math.ceil(per_token["kept"] * tokens)
        logits = math.ceil(per_token["logits"] * tokens) * n
        comm = 0
        if pp > 1:
            buffer = tokens * dims.hidden * e
            comm = m * buffer * ((0 if first else 1) + (0 if last else 1))
        transient = math.ceil(per_token["transient"] * tokens)
        state = weights + master + optimizer
        pipeline = state + grads + act * n + logits + comm + transient
        # fp32 gradients on the masters (in fp32 the model's own gradients, which live in the
        # flat buckets the dp all-reduce sums in place); over fp32 masters the model-dtype
        # gradients are converted bucket by bucket, each bucket freed once converted.
        bucket = min(BUCKET_NUMEL, trainable) * e if e != 4 else 0
        step = state + trainable * 4 + bucket + comm
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


def linear_shapes(dims: ModelDims) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module in one layer, by module name."""
    h, i = dims.hidden, dims.intermediate
    if dims.model_type == "gpt_neox":
        return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i),
                "dense_4h_to_h": (i, h)}  # fmt: skip
    if dims.model_type == "gptj":
        return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h),
                "fc_in": (h, i), "fc_out": (i, h)}  # fmt: skip
    kv = dims.kv_heads * dims.head_dim
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def _lora_targets(dims: ModelDims, setup: TrainSetup) -> list[tuple[int, int]]:
    """(in, out) of each adapted module in one layer (peft matches a target by name suffix)."""
    shapes = linear_shapes(dims)
    return [
        shapes[t.rsplit(".", 1)[-1]] for t in setup.lora_targets if t.rsplit(".", 1)[-1] in shapes
    ]


def _lora_activation_bytes(dims: ModelDims, setup: TrainSetup) -> float:
    """Per token and layer, what the adapters add: A's output (r) and, with dropout, the
    dropped input and its mask (a bool mask on CUDA, one of the input's dtype on CPU). The base
    layer's own bytes are counted as in full fine-tuning: an upper bound, since a frozen linear
    keeps no input for a weight gradient (measured on tiny layers: 1.2-1.5x what LoRA keeps)."""
    e = ELEMENT_BYTES[setup.precision]
    total = 0.0
    for fan_in, _ in _lora_targets(dims, setup):
        total += setup.lora_r * e + (fan_in * 2 * e if setup.lora_dropout > 0 else 0)
    return total


def _small_layer_params(dims: ModelDims) -> int:
    """Parameters of one layer held in tensors below bitsandbytes' 8-bit size (norms, biases)."""
    sizes = {
        "gpt_neox": [dims.hidden] * 4 + [3 * dims.hidden, dims.hidden, dims.intermediate, dims.hidden],
        "gptj": [dims.hidden] * 2 + [dims.intermediate, dims.hidden],
        "llama": [dims.hidden] * 2,
    }[dims.model_type]  # fmt: skip
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
    ckpt = replace(setup, checkpointing="layers")
    if setup.checkpointing == "none":
        out.append(("--activation-checkpointing layers", ckpt))
    one_f = setup.pp > 1 and setup.schedule == "gpipe" and setup.num_microbatches >= setup.pp
    if one_f:
        out.append(("--pp-mode 1f1b", replace(setup, schedule="1f1b")))
        if setup.checkpointing == "none":
            out.append(
                ("--pp-mode 1f1b --activation-checkpointing layers", replace(ckpt, schedule="1f1b"))
            )
    mb = setup.micro_batch_size
    while mb > 1:
        mb //= 2
        factor = setup.micro_batch_size // mb
        smaller = replace(
            setup, micro_batch_size=mb, num_microbatches=setup.num_microbatches * factor
        )
        out.append((f"--micro-batch-size {mb}", smaller))
        if setup.checkpointing == "none":
            out.append((f"--micro-batch-size {mb} --activation-checkpointing layers",
                        replace(smaller, checkpointing="layers")))  # fmt: skip
    pp = setup.pp * 2
    while pp <= num_layers and pp <= 64:
        ranges = _even_ranges(num_layers, pp)
        if setup.schedule != "1f1b" or setup.num_microbatches >= pp:
            out.append(
                (f"--pipeline-group-size {pp} (more GPUs)", replace(setup, layer_ranges=ranges))
            )
        pp *= 2
    return out


def _even_ranges(num_layers: int, pp: int) -> tuple[range, ...]:
    base, extra = divmod(num_layers, pp)
    sizes = [base + (1 if s < extra else 0) for s in range(pp)]
    return tuple(range(sum(sizes[:s]), sum(sizes[: s + 1])) for s in range(pp))


def refusal(dims: ModelDims, setup: TrainSetup, gpu_bytes: float) -> str | None:
    """None when every stage fits `gpu_bytes`; else one line naming the worst stage, the
    shortfall and the cheapest change that fits."""
    plans = plan_memory(dims, setup)
    worst = max(plans, key=lambda p: p.peak)
    if worst.peak <= gpu_bytes:
        return None
    line = (
        f"stage {worst.stage} (layers {worst.layers.start}-{worst.layers.stop - 1}) needs "
        f"{gib(worst.peak)} GiB of {gib(gpu_bytes)} GiB per GPU, {gib(worst.peak - gpu_bytes)} GiB "
        "short"
    )
    for flags, candidate in _fixes(setup, dims.num_layers):
        peak = max(p.peak for p in plan_memory(dims, candidate))
        if peak <= gpu_bytes:
            return f"{line}; cheapest fix: {flags} (peak {gib(peak)} GiB)"
    other = "" if setup.optimizer in EIGHT_BIT else " or --optimizer 8bit-adam"
    return f"{line}; no single change fits: use more GPUs, a shorter --seq-length{other}"


def check_fits(
    dims: ModelDims, setup: TrainSetup, gpu_bytes: float, error: Callable[[str], Exception]
) -> list[StageMemory]:
    """Plan, and raise `error(one line)` when a stage does not fit."""
    message = refusal(dims, setup, gpu_bytes)
    if message is not None:
        raise error(f"out of GPU memory before starting: {message}")
    return plan_memory(dims, setup)


# -- from the trainer's flags ------------------------------------------------------------------
def read_dims(model_name: str | Path) -> tuple[ModelDims, str]:
    """The model's dims from `<model_name>/config.json`, else from KNOWN_CONFIGS by folder name
    (a plan needs no download). Returns (dims, where they came from)."""
    folder = Path(model_name)
    path = folder / "config.json"
    if path.is_file():
        try:
            return ModelDims.from_config(json.loads(path.read_text())), str(path)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"--model-name {folder}: unusable config.json ({err})") from None
    known = KNOWN_CONFIGS.get(folder.name)
    if known is None:
        raise UserError(
            f"--model-name {folder}: no config.json there, and {folder.name!r} is not one of "
            f"the shipped models ({', '.join(sorted(KNOWN_CONFIGS))})"
        )
    return ModelDims.from_config(known), f"the published config of {folder.name}"


def setup_from_config(config: Any) -> TrainSetup:
    """TrainSetup from a `TrainConfig` (openchatkit/training/config.py)."""
    return TrainSetup(
        layer_ranges=tuple(config.layer_ranges),
        micro_batch_size=config.micro_batch_size,
        seq_length=config.seq_length,
        num_microbatches=config.num_microbatches,
        schedule=config.pp_mode,
        precision=config.precision,
        optimizer=config.optimizer,
        checkpointing=config.activation_checkpointing,
        dp=config.dp,
        lora_r=config.lora.r if config.lora is not None else 0,
        lora_targets=tuple(config.lora.target_modules) if config.lora is not None else (),
        lora_dropout=config.lora.dropout if config.lora is not None else 0.0,
        load_in_4bit=config.load_in_4bit,
    )


def check_before_training(config: Any, device_bytes: Callable[[int], int]) -> None:
    """The trainer's start-up check (CUDA only, before any allocation): refuse in one line
    when a stage will not fit `--gpu-memory` GiB (default: the device's memory, from
    `device_bytes(cuda_id)`)."""
    if config.device != "cuda":
        return
    dims, _ = read_dims(config.model_name)
    if config.gpu_memory is not None:
        gpu = config.gpu_memory * GIB
    else:
        gpu = device_bytes(config.cuda_id if config.cuda_id is not None else 0)
    check_fits(dims, setup_from_config(config), gpu, UserError)
