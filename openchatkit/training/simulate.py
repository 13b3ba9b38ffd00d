"""Run a training recipe's ranks at full size on a CPU: fake tensors, a fake process group, the
real `TrainEngine`, and the device bytes each stage keeps at its highest.

Every rank of the recipe runs in turn in this process, on torch's fake process group
(`init_process_group("fake", store=FakeStore())`: collectives and sends complete at once and
move nothing) and under `FakeTensorMode` (tensors have shapes, dtypes and storages of a size but
no memory, and ops do no arithmetic). Each rank builds its stage from the model's config (no
weights read), wraps it in the real `TrainEngine` with the recipe's own `TrainConfig` (built for
CUDA: fused AdamW, the precision, checkpointing on by default, fp32 gradient buckets) and runs
two optimizer steps: the recipe's schedule through `torch.distributed.pipelining`, recomputed
layers, the loss with its fused head, the gradient buckets, the fp32 masters, the optimizer and
the loss scaler; then what a save takes from the engine (`state_dict`, copies to host).

Making the code believe it is on CUDA: CPU-only torch cannot keep fake "cuda" tensors under
autograd, so the engine is given `cuda:0` and `DeviceSim` (a TorchDispatchMode) turns every
tensor made for it (a factory op with `device=cuda`, a `.to(cuda)`) into a fake CPU tensor
whose storage it tags as on the device; an op's outputs are on the device when its inputs are.
An op that mixes a device tensor with a host tensor of one or more dimensions (which CUDA
refuses) stops the simulation with `SimulatedDeviceError` naming the op, the tensors and the
line of this project that ran it (copies in either direction and 0-dim host scalars are
allowed, as on CUDA).

Bytes: `DeviceSim` counts the storages on the device while they live (a weakref finalizer per
storage, as `memory_probe.LiveBytes`), and at each new peak records the phase (forward,
backward, step, save) and the bytes by what allocated them (weights, masters, grads,
optimizer, activations: the forward and backward's tensors, receive buffers included). The
fp32 transient of building a stage (built in fp32, then cast) is left out: it is freed before
training, and a run that loads weights never makes it. `.item()` on a fake tensor answers 1:
token counts, the grad norm and the loss are not values here, so every step is applied.

LoRA runs as is (peft's adapters on the fake stage; `adapter_moves` registers the adapters it
moves to the device anew, where `Module.to` would swap fake parameters and fail). 8-bit Adam and
NF4 (QLoRA) call bitsandbytes' kernels, which fake tensors cannot run: they are counted, not
simulated. The rank runs an unquantized base in the run's dtype and torch's AdamW, and the bytes
at its peak then get NF4 with double quantisation for the layers' linear weights (0.5 + 1/64 +
4/16384 bytes per weight) and bitsandbytes' blockwise 8-bit state for AdamW's (2 bytes per
parameter + two fp32 absmax per 256-element block; 32-bit state under 4096 elements)
(`layout_counted` names what was counted; the script prints it). Not seen that way:
bitsandbytes' dequantized copy of one weight during a 4-bit matmul (one linear's weight in the
compute dtype, freed after it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import traceback
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from openchatkit.training.memory import NF4_BYTES_PER_WEIGHT
from openchatkit.training.optim import EIGHT_BIT

GIB = 1024**3
PHASES = ("forward", "backward", "step", "save")
_aten = torch.ops.aten
# Ops that may take a device tensor and a host tensor: copies in either direction.
_COPIES = {_aten.copy_.default, _aten._to_copy.default, _aten.lift_fresh.default}


class SimulatedDeviceError(RuntimeError):
    """An op mixed a device tensor with a host one (a CUDA run would fail there)."""


def _caller() -> str:
    """The innermost frame of this project's code (not torch's, not this module's)."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if "openchatkit" in name and not name.endswith("simulate.py"):
            return f"{name}:{frame.lineno} ({frame.line})"
    return "outside openchatkit"


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


class DeviceSim(TorchDispatchMode):
    """Tags the tensors made for the run's CUDA device, checks ops for device mixing, and counts
    the device bytes alive (see the module docstring). Enter inside a `FakeTensorMode`."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, category)
        self.by_category: dict[str, int] = defaultdict(int)
        self.live = 0
        self.peak = 0
        self.peak_phase = "setup"
        self.peak_parts: dict[str, int] = {}
        self.phase = "setup"
        self.category = "weights"
        self.inside = 0  # > 0 while an op runs below this mode

    # -- bookkeeping ---------------------------------------------------------------------------
    def on_device(self, t: torch.Tensor) -> bool:
        return t.untyped_storage()._cdata in self._storages

    def tag(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            return
        size = storage.nbytes()
        self._storages[key] = (size, self.category)
        self.by_category[self.category] += size
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
            self.peak_phase = self.phase
            self.peak_parts = dict(self.by_category)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live -= entry[0]
            self.by_category[entry[1]] -= entry[0]

    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_phase = self.phase
        self.peak_parts = dict(self.by_category)

    @contextlib.contextmanager
    def context(self, phase: str | None = None, category: str | None = None) -> Iterator[None]:
        before = self.phase, self.category
        self.phase = phase or self.phase
        self.category = category or self.category
        try:
            yield
        finally:
            self.phase, self.category = before

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is _aten._local_scalar_dense.default:
            # `.item()`: no values here (see the module docstring).
            return True if args[0].dtype == torch.bool else 1
        target = kwargs.get("device")
        to_device = target is not None and torch.device(target).type == "cuda"
        if target is not None and not to_device and torch._C._current_graph_task_id() != -1:
            # The autograd engine makes its zeros and casts on an input's real device (CPU
            # here), where a GPU run has the device: inside a backward a CPU factory is the
            # device's. (A host tensor made by a custom Function's backward is not caught.)
            to_device = True
        if to_device:
            kwargs["device"] = torch.device("cpu")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        mine = [t for t in tensors if self.on_device(t)]
        if mine and target is None and func not in _COPIES:
            host = [t for t in tensors if t.dim() > 0 and not self.on_device(t)]
            if host:
                raise SimulatedDeviceError(
                    f"{func} mixes a device tensor {_describe(mine[0])} with a host tensor "
                    f"{_describe(host[0])} at {_caller()}"
                )
        self.inside += 1  # inside the op (decompositions, fake kernels): the real devices
        try:
            out = func(*args, **kwargs)
        finally:
            self.inside -= 1
        # Outputs stay where the inputs are unless the op names a device (`.to("cpu")` is a
        # copy to host; an in-place copy returns its device destination, already tagged).
        if to_device or (mine and target is None):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.tag(t)
        return out


@contextlib.contextmanager
def cuda_moves(sim: DeviceSim) -> Iterator[None]:
    """`Tensor.to(cuda)` / `.cuda()` as tagged CPU tensors: CPU-only torch refuses a CUDA
    device in `.to` before any dispatch mode sees the call."""
    original_to, original_cuda = torch.Tensor.to, torch.Tensor.cuda

    def is_cuda(x: Any) -> bool:
        return isinstance(x, (str, torch.device)) and torch.device(x).type == "cuda"

    def to(self, *args, **kwargs):
        if any(is_cuda(a) for a in args) or is_cuda(kwargs.get("device")):
            others = [a for a in args if not is_cuda(a)]
            if sim.on_device(self) and not others and set(kwargs) <= {"device"}:
                return self  # already there: no copy (as on CUDA; Module.to swaps nothing)
            args = tuple("cpu" if is_cuda(a) else a for a in args)
            if "device" in kwargs:
                kwargs["device"] = "cpu"
            out = original_to(self, *args, **kwargs)
            sim.tag(out)
            return out
        return original_to(self, *args, **kwargs)

    def cuda(self, *args, **kwargs):
        out = original_to(self, "cpu")
        sim.tag(out)
        return out

    # A device tensor reports cuda:0 as its device, so that code making a tensor "where x is"
    # (`device=x.device`) makes a device tensor; fake tensors inside an op see theirs.
    from torch._subclasses.fake_tensor import FakeTensor

    original_device = FakeTensor.device
    cuda0 = torch.device("cuda", 0)

    def device(self):
        real = original_device.fget(self)
        if sim.inside or real.type != "cpu" or not sim.on_device(self):
            return real
        return cuda0

    # torch.utils.checkpoint saves and restores the RNG state of the inputs' CUDA devices,
    # which CPU-only torch cannot read: no device RNG state here.
    import torch.utils.checkpoint as ckpt

    # Likewise pipelining's fork_rng around its shape checks.
    states = ckpt.get_device_states, ckpt.set_device_states
    rng = torch.cuda.get_rng_state, torch.cuda.set_rng_state
    torch.Tensor.to, torch.Tensor.cuda = to, cuda
    FakeTensor.device = property(device)
    ckpt.get_device_states = lambda *args: ([], [])
    ckpt.set_device_states = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.cuda = original_to, original_cuda
        FakeTensor.device = original_device
        ckpt.get_device_states, ckpt.set_device_states = states
        torch.cuda.get_rng_state, torch.cuda.set_rng_state = rng


@contextlib.contextmanager
def adapter_moves() -> Iterator[None]:
    """peft moves each new adapter to its base layer's device and dtype with `Module.to`, which
    for fake parameters swaps them in place (`torch.utils.swap_tensors`) and fails on the fake
    mode's weak references: while adapters are injected, `Module.to` converts each parameter and
    buffer and registers the result anew instead (the tensors a swap would give, through
    `cuda_moves`' `.to`; a tensor already there in its dtype is kept)."""
    original = torch.nn.Module.to

    def convert(t: torch.Tensor, device: Any, dtype: Any) -> torch.Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if device is not None and t.device != torch.device(device):
            t = t.to(device)
        return t if t.dtype == cast else t.to(cast)

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for module in self.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    new = convert(p.detach(), device, dtype)
                    if new is not p.detach() and new is not p:
                        module._parameters[name] = torch.nn.Parameter(new, p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = convert(b, device, dtype)
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextlib.contextmanager
def phases(sim: DeviceSim) -> Iterator[None]:
    """Label what runs inside `torch.autograd.backward` as the backward (recomputed layers
    included); the engine's step phases are set by `simulate_rank`."""
    original = torch.autograd.backward

    def backward(*args, **kwargs):
        with sim.context("backward", "activations"):
            return original(*args, **kwargs)

    torch.autograd.backward = backward
    try:
        yield
    finally:
        torch.autograd.backward = original


@contextlib.contextmanager
def static_pipeline_stages(micro_batch: int, seq: int, hidden: int, dtype: torch.dtype):
    """Give `PipelineStage` its input and output shapes up front (ids (B, S) into the first
    stage, hidden states (B, S, H) between stages), so that it does not ask its neighbours for
    them: over the fake process group nothing would answer."""
    import torch.distributed.pipelining as pipelining

    original = pipelining.PipelineStage

    class StaticStage(original):  # type: ignore[misc, valid-type]
        def __init__(self, submodule, stage_index, num_stages, device, group=None, **kwargs):
            hidden_meta = torch.empty(micro_batch, seq, hidden, dtype=dtype, device="meta")
            first = stage_index == 0
            ids = torch.empty(micro_batch, seq, dtype=torch.long, device="meta")
            super().__init__(
                submodule,
                stage_index,
                num_stages,
                device,
                input_args=ids if first else hidden_meta,
                output_args=hidden_meta,
                # The gradients that come back from the next stage and go to the previous one.
                output_grads=None if stage_index == num_stages - 1 else hidden_meta,
                input_grads=None if first else hidden_meta,
                group=group,
                **kwargs,
            )

    pipelining.PipelineStage = StaticStage
    try:
        yield
    finally:
        pipelining.PipelineStage = original


@dataclass
class RankResult:
    rank: int
    stage: int
    peak_bytes: int
    phase: str
    parts: dict[str, int] = field(default_factory=dict)


def _batches(config: Any, vocab: int) -> list[dict[str, torch.Tensor]]:
    """One replica's accumulation batches of random token ids (fake: nothing is drawn)."""
    rows, seq = config.replica_batch_sequences, config.seq_length
    out = []
    for _ in range(config.gradient_accumulate_step):
        ids = torch.randint(0, vocab, (rows, seq))
        out.append(
            {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq).expand(rows, seq)}
        )
    return out


def simulate_rank(config: Any, hf_config: Any, rank: int, steps: int = 2) -> RankResult:
    """One rank of `config` (a `TrainConfig` for CUDA) on the fake process group; see the
    module docstring. Initialises and destroys the process group itself."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from openchatkit.distributed.layout import ParallelLayout
    from openchatkit.models.stage import StageModel
    from openchatkit.training.engine import TrainEngine

    counted = layout_counted(config)
    if counted:
        # bitsandbytes' kernels cannot run on fake tensors: run an unquantized base and torch's
        # AdamW, then count NF4 and the 8-bit state from their layout (`_count_layout`).
        config = dataclasses.replace(config, load_in_4bit=False, optimizer="adam")
        four_bit, eight_bit = "NF4" in " ".join(counted), any("8-bit" in c for c in counted)
    layout = ParallelLayout(config.pp, config.dp, rank)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.precision]
    device = torch.device("cuda", 0)
    if layout.is_distributed:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world_size)
    try:
        layout.init_groups("cpu", tied=config.model.tie_word_embeddings)
        sim = DeviceSim()
        hidden = config.model.hidden_size
        with contextlib.ExitStack() as stack:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(sim)
            stack.enter_context(cuda_moves(sim))
            stack.enter_context(phases(sim))
            stack.enter_context(
                static_pipeline_stages(config.micro_batch_size, config.seq_length, hidden, dtype)
            )
            with sim.context("setup", "weights"):
                stage = StageModel(
                    hf_config,
                    config.layer_ranges[layout.pp_rank],
                    layout.is_first_stage,
                    layout.is_last_stage,
                    dtype=dtype,
                    device=device,
                )
                # The layers' linear weights, before any adapter (NF4 under QLoRA).
                linear_numel = sum(
                    m.weight.numel()
                    for m in stage.layers.modules()
                    if isinstance(m, torch.nn.Linear)
                )
                if config.lora is not None:
                    from openchatkit.models.lora import apply_lora

                    with adapter_moves():
                        apply_lora(stage, config.lora, seed=config.seed)
                stage.set_activation_checkpointing(config.activation_checkpointing)
            with sim.context("setup", "masters"):
                engine = TrainEngine(stage, layout, config, device=device)
            _instrument(engine, sim)
            batches = _batches(config, config.model.vocab_size)
            sim.reset_peak()  # not the fp32 build transient (module docstring)
            for _ in range(steps):
                with sim.context("forward", "activations"):
                    engine.train_step(batches)
            with sim.context("save", "save"):
                state, masters = engine.state_dict()
                weights = {k: v.to("cpu", copy=True) for k, v in stage.state_dict().items()}
                del state, masters, weights
            parts = dict(sim.peak_parts)
            if counted:
                trainable = [p.numel() for p in stage.parameters() if p.requires_grad]
                adam_bytes = sim.by_category["optimizer"]  # all of AdamW's state, allocated
                _count_layout(
                    parts, four_bit, eight_bit, linear_numel, dtype, trainable, adam_bytes
                )
        return RankResult(rank, layout.pp_rank, sum(parts.values()), sim.peak_phase, parts)
    finally:
        if layout.is_distributed:
            dist.destroy_process_group()


def layout_counted(config: Any) -> list[str]:
    """What a run of `config` counts from a documented layout instead of simulating (empty:
    everything is simulated)."""
    out = []
    if config.load_in_4bit:
        out.append(f"NF4 base weights ({NF4_BYTES_PER_WEIGHT:.4f} bytes per weight)")
    if config.optimizer in EIGHT_BIT:
        out.append("8-bit Adam state (2 bytes per parameter + 8 per 256-element block)")
    return out


def _count_layout(
    parts: dict[str, int],
    four_bit: bool,
    eight_bit: bool,
    linear_numel: int,
    dtype: torch.dtype,
    trainable: list[int],
    adam_bytes: int,
) -> None:
    """Replace, in the bytes at the peak, the unquantized layer linears by NF4 with double
    quantisation (bitsandbytes' `Params4bit` default, as `quantize_linear_4bit` makes them) and
    AdamW's state by bitsandbytes' blockwise 8-bit state (two uint8 moments and two fp32
    absmax per 256-element block; fp32 moments for tensors under 4096 elements)."""
    from openchatkit.training.memory import BNB_MIN_8BIT_SIZE

    if four_bit:
        element = torch.empty((), dtype=dtype).element_size()
        nf4 = math.ceil(linear_numel * NF4_BYTES_PER_WEIGHT)
        parts["weights"] = parts.get("weights", 0) - linear_numel * element + nf4
    if eight_bit and parts.get("optimizer", 0) and adam_bytes:
        state = sum(
            8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 8 * math.ceil(n / 256) for n in trainable
        )
        # The share of AdamW's state alive at the peak, in 8-bit.
        parts["optimizer"] = math.ceil(parts["optimizer"] * state / adam_bytes)


def _instrument(engine: Any, sim: DeviceSim) -> None:
    """Phase and category labels around the engine's parts (instance attributes only)."""
    begin, finish = engine.grads.begin, engine.grads.finish
    step = engine.optimizer.step

    def labelled_begin(*args, **kwargs):
        with sim.context(category="grads"):
            return begin(*args, **kwargs)

    def labelled_finish(*args, **kwargs):
        sim.phase, sim.category = "step", "activations"
        return finish(*args, **kwargs)

    def labelled_step(*args, **kwargs):
        with sim.context("step", "optimizer"):
            return step(*args, **kwargs)

    engine.grads.begin, engine.grads.finish = labelled_begin, labelled_finish
    engine.optimizer.step = labelled_step


@dataclass
class StageReport:
    stage: int
    planned_bytes: float  # the planner's peak, its runtime allowance included
    simulated_bytes: float  # the simulated device peak plus the same allowance
    phase: str
    parts: dict[str, int]

    @property
    def ratio(self) -> float:
        return self.planned_bytes / self.simulated_bytes if self.simulated_bytes else math.nan


def simulate_config(
    config: Any, hf_config: Any, plans: list[Any], runtime_bytes: float, steps: int = 2
) -> tuple[list[StageReport], float]:
    """Every rank of `config`, one after the other; per stage the highest of its replicas.
    Returns (reports by stage, seconds)."""
    t0 = time.perf_counter()
    best: dict[int, RankResult] = {}
    for rank in range(config.pp * config.dp):
        r = simulate_rank(config, hf_config, rank, steps)
        if r.stage not in best or r.peak_bytes > best[r.stage].peak_bytes:
            best[r.stage] = r
    reports = [
        StageReport(
            stage=k,
            planned_bytes=plans[k].peak,
            simulated_bytes=best[k].peak_bytes + runtime_bytes,
            phase=best[k].phase,
            parts={c: b for c, b in best[k].parts.items() if b},
        )
        for k in sorted(best)
    ]
    return reports, time.perf_counter() - t0


def format_reports(reports: list[StageReport], gpu_bytes: float | None) -> str:
    """The per-stage table: planned and simulated GiB (both with the runtime allowance), their
    ratio, the phase of the simulated peak and its parts."""
    lines = ["stage  planned  simulated  plan/sim  phase     parts at the simulated peak (GiB)"]
    for r in reports:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(r.parts.items()))
        lines.append(
            f"{r.stage:5d}  {r.planned_bytes / GIB:7.1f}  {r.simulated_bytes / GIB:9.1f}  "
            f"{r.ratio:8.2f}  {r.phase:8s}  {parts}"
        )
    worst = max(reports, key=lambda r: r.simulated_bytes)
    verdict = f"simulated peak {worst.simulated_bytes / GIB:.1f} GiB on stage {worst.stage}"
    if gpu_bytes is not None:
        fits = worst.simulated_bytes <= gpu_bytes
        verdict += f"; {'fits' if fits else 'does not fit'} in {gpu_bytes / GIB:.1f} GiB"
    return "\n".join([*lines, verdict])


def reports_json(
    reports: list[StageReport], gpu_bytes: float | None, seconds: float
) -> dict[str, Any]:
    return {
        "stages": [
            {
                "stage": r.stage,
                "planned_gib": r.planned_bytes / GIB,
                "simulated_gib": r.simulated_bytes / GIB,
                "phase": r.phase,
                "parts": {k: v / GIB for k, v in r.parts.items()},
            }
            for r in reports
        ],
        "gpu_memory_gib": gpu_bytes / GIB if gpu_bytes is not None else None,
        "fits": None if gpu_bytes is None else all(r.simulated_bytes <= gpu_bytes for r in reports),
        "seconds": seconds,
    }
