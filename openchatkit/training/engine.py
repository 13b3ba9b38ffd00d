"""One training step of a pipeline x data-parallel job, over `torch.distributed.pipelining`.

Per optimizer step, on every rank:
1. The global number of target tokens N (labels != -100 after the shift, over all accumulation
   passes and data-parallel replicas) is all-reduced over the dp group; the loss of a micro-batch
   is sum(token cross-entropy) / N, so the summed gradients equal one process's gradient of the
   token-mean loss on the whole global batch (upstream summed per-replica means instead).
2. Each accumulation pass runs the schedule (GPipe or 1F1B; a plain loop when pp == 1) with the
   position ids passed as keyword arguments on every rank (they are not sent between stages); the
   last stage's LM head runs inside the loss, fused with the cross-entropy when it is a plain
   `nn.Linear` (not LoRA-adapted), with the logits in fp32 (`loss.py`).
3. Gradients are summed over the dp group: they live in flat buckets (reverse parameter order),
   and each bucket's all-reduce starts asynchronously as soon as the backward of the last
   micro-batch has produced its gradients, overlapping the rest of the backward
   (`grad_buckets.py`). Then the two copies of a tied embedding (first stage's `embed.*`, last
   stage's `head.lm_head.weight`) are summed over the tie group so both stay identical.
4. Grad norm and the overflow check are reduced over the pp group (the tied copy counted once),
   the step is skipped on a non-finite norm (fp16: the loss scale halves, the LR schedule does
   not advance), grads are clipped, the optimizer and LR schedule step, and fp32 masters are
   copied back into the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from openchatkit.distributed.layout import ParallelLayout
from openchatkit.training.config import TrainConfig
from openchatkit.training.grad_buckets import GradBuckets
from openchatkit.training.loss import move_head_into_loss, shifted_targets
from openchatkit.training.optim import (
    build_optimizer,
    build_scheduler,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)
from openchatkit.training.precision import LossScaler, MasterWeights

# Elements per all-reduce bucket (fp32: 100 MB): big enough to amortise latency, small enough
# not to double a 20B stage's memory.
BUCKET_NUMEL = 25_000_000


def count_target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labels (B, S) shifted left by one, -100 ignored."""
    return int((labels[:, 1:] != -100).sum().item())


class TokenMeanLoss:
    """Cross-entropy summed over tokens, divided by the global token count and scaled.

    `normalizer` and `scale` are set before each step (the schedule calls this per micro-batch).
    """

    def __init__(self) -> None:
        self.normalizer = 1.0
        self.scale = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits (B, S, V) in the model dtype; the labels are shifted, not the logits.
        return self.on_rows(logits.reshape(-1, logits.shape[-1]), shifted_targets(labels))

    def on_rows(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (N, V) in the model dtype, upcast to fp32 before log-softmax (a no-op in
        fp32); target (N,), -100 ignored."""
        loss = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
        return loss * (self.scale / self.normalizer)


@dataclass
class StepResult:
    loss: float  # token-mean loss over the global batch
    grad_norm: float  # before clipping (inf/nan when the step was skipped)
    skipped: bool
    num_tokens: int  # target tokens in the global batch
    lr: float
    loss_scale: float


class LocalSchedule:
    """The pp == 1 path: forward, loss and backward per micro-batch in one process."""

    def __init__(self, module: torch.nn.Module, n_microbatches: int, loss_fn: Callable):
        self.module = module
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn

    def _chunks(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.tensor_split(self.n_microbatches, dim=0)

    def step(self, input_ids, *, target, losses: list, position_ids=None, grad=True):
        ids, labels = self._chunks(input_ids), self._chunks(target)
        pos = self._chunks(position_ids) if position_ids is not None else [None] * len(ids)
        losses.clear()
        for i, (x, y, p) in enumerate(zip(ids, labels, pos, strict=True)):
            with torch.set_grad_enabled(grad), torch.profiler.record_function(f"forward_chunk {i}"):
                loss = self.loss_fn(self.module(x, position_ids=p), y)
            if grad:
                with torch.profiler.record_function(f"backward_chunk {i}"):
                    loss.backward()
            losses.append(loss.detach())


class TrainEngine:
    """Runs optimizer steps for one stage of one replica; see the module docstring."""

    def __init__(
        self,
        module: torch.nn.Module,
        layout: ParallelLayout,
        config: TrainConfig,
        *,
        device: torch.device,
    ):
        """`module` is this rank's stage (a `StageModel`; its `tied_copy_names` say whether a
        tied embedding is split over the pipeline). The engine owns what the optimizer updates:
        the fp32 master weights, the optimizer, the LR schedule and the loss scale."""
        self.module = module
        self.layout = layout
        self.device = device
        self.n_microbatches = config.num_microbatches
        self.max_grad_norm = config.max_grad_norm
        self.scaler = LossScaler(
            config.precision == "fp16", config.initial_loss_scale, config.loss_scale_window
        )
        self.loss_fn = TokenMeanLoss()
        if layout.is_last_stage:  # the LM head runs inside the loss (training/loss.py)
            self.loss_fn = move_head_into_loss(
                module,
                self.loss_fn,
                # GPipe holds every micro-batch on the last stage: keep hidden states only.
                recompute=layout.pp > 1 and config.pp_mode == "gpipe",
                # --loss-on bot: the head and cross-entropy only on the rows with a target.
                select_rows=config.loss_on == "bot",
            )
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.master = MasterWeights(named)
        # Under LoRA the embeddings are frozen: no tied gradients to keep in step.
        tied_names = getattr(module, "tied_copy_names", None) if config.lora is None else None
        self.tied_names = tied_names
        # name -> the name its state is saved under (the head copy of a tied embedding is
        # saved once, as the embedding).
        self.alias = {tied_names[1]: tied_names[0]} if tied_names is not None else {}
        self._tied_local = None
        if tied_names is not None:
            params = dict(named)
            # First stage holds the embedding, last stage the head copy; pp >= 2 here.
            if layout.is_first_stage:
                self._tied_local = params[tied_names[0]]
            elif layout.is_last_stage:
                self._tied_local = params[tied_names[1]]
        # Names counted in the grad norm; the head copy of a tied embedding is counted once
        # (as the embedding on the first stage).
        self._norm_skip = set(self.alias)
        self.optimizer = build_optimizer(
            self.master.params, config.optimizer, config.lr, config.weight_decay
        )
        self.scheduler = build_scheduler(
            self.optimizer, config.warmup_steps, config.total_steps, config.lr_decay_style
        )
        # Gradients in flat buckets, summed over dp during the backward. In fp32 the optimizer
        # reads them, so the buffers persist. Over fp32 masters (fp16/bf16) the buckets are
        # fp32: micro-batches are summed and all-reduced in fp32, the masters read them as
        # their gradients, and they are freed after each step.
        self._master_of = dict(
            zip(map(id, self.master.model_params), self.master.params, strict=True)
        )
        self.grads = GradBuckets(
            self.master.model_params,
            layout.dp_group,
            BUCKET_NUMEL,
            persistent=not self.master.uses_master,
            accum_dtype=torch.float32 if self.master.uses_master else None,
        )
        self.tracer = None  # set by the trainer when profiling (a torch profiler span helper)
        if layout.pp > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            self.stage = PipelineStage(
                module, layout.pp_rank, layout.pp, device, group=layout.pp_group
            )
            cls = ScheduleGPipe if config.pp_mode == "gpipe" else Schedule1F1B
            # scale_grads=False: the loss is already divided by the global token count.
            self.schedule = cls(
                self.stage, self.n_microbatches, loss_fn=self.loss_fn, scale_grads=False
            )
        else:
            self.stage = None
            self.schedule = LocalSchedule(module, self.n_microbatches, self.loss_fn)

    @torch.no_grad()
    def share_tied_init(self) -> None:
        """After a random init, give the last stage's copy of a tied embedding the first
        stage's values (collective over the tie group; a no-op without tied copies)."""
        if self._tied_local is None:
            return
        dist.broadcast(
            self._tied_local.data, src=self.layout.first_stage_rank, group=self.layout.tie_group
        )
        self.master.model_to_master()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
        """(optimizer state by parameter name, fp32 masters by name), the tied copy left out:
        its state is the embedding's."""
        skip = set(self.alias)
        state = optimizer_state_by_name(self.optimizer, self.master.names, skip)
        masters = {k: v for k, v in self.master.master_state().items() if k not in skip}
        return state, masters

    def load_state_dict(
        self, states: dict[str, dict], masters: dict[str, torch.Tensor]
    ) -> list[str]:
        """Load what `state_dict` saved, under any layout; returns the parameters that had no
        saved optimizer state."""
        missing = load_optimizer_state_by_name(
            self.optimizer, self.master.names, states, self.alias
        )
        self.master.load_master_state(masters, self.alias)
        return missing

    def schedule_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "loss_scale": self.scaler.state_dict()}

    def load_schedule_state(self, meta: dict) -> None:
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(
            self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr
        self.scaler.load_state_dict(meta["loss_scale"])

    def enable_tracing(self, tracer: object) -> None:
        """Name forward/backward regions per micro-batch for the profiler (1F1B has none)."""
        self.tracer = tracer
        if self.stage is None:
            return
        stage = self.stage
        forward, backward = stage.forward_one_chunk, stage.backward_one_chunk

        def traced_forward(i, *args, **kwargs):
            with torch.profiler.record_function(f"forward_chunk {i}"):
                return forward(i, *args, **kwargs)

        def traced_backward(i, *args, **kwargs):
            with torch.profiler.record_function(f"backward_chunk {i}"):
                return backward(i, *args, **kwargs)

        stage.forward_one_chunk = traced_forward
        stage.backward_one_chunk = traced_backward

    # -- helpers -------------------------------------------------------------------------------
    def span(self, name: str) -> contextlib.AbstractContextManager:
        if self.tracer is None:
            return contextlib.nullcontext()
        return torch.profiler.record_function(name)

    def _all_reduce(self, tensor: torch.Tensor, group) -> None:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)

    def _run_pipeline(self, batch: dict[str, torch.Tensor], grad: bool) -> torch.Tensor:
        """One pipeline pass over a replica batch (B_local, S); returns the summed loss here
        (zero off the last stage)."""
        losses: list[torch.Tensor] = []
        ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        pos = batch["position_ids"].to(self.device)
        if self.stage is None:
            self.schedule.step(ids, target=labels, losses=losses, position_ids=pos, grad=grad)
        else:
            args = (ids,) if self.layout.is_first_stage else ()
            target = labels if self.layout.is_last_stage else None
            runner = self.schedule.step if grad else self.schedule.eval
            # return_outputs=False: the last stage keeps no micro-batch's logits past its loss.
            if self.layout.is_last_stage:
                runner(*args, target=target, losses=losses, position_ids=pos, return_outputs=False)
            else:
                runner(*args, position_ids=pos, return_outputs=False)
            # Every send has completed: drop the receive buffers' input gradients (m micro-batch
            # activations' worth on stages 1..pp-1), which would otherwise stay allocated
            # through the optimizer step until the next step's schedule clears them.
            self.stage.clear_runtime_states()
        if not losses:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return torch.stack([x.detach().double() for x in losses]).sum()

    def _grads_to_master(self) -> None:
        """Hand the summed gradients to the optimizer: over fp32 masters, each master's
        gradient is its fp32 slice of the buckets (no copy; freed by `end_step`)."""
        if not self.master.uses_master:
            return  # the optimizer updates the model parameters and reads their views
        for bucket in self.grads.buckets:
            for p in bucket.params:
                self._master_of[id(p)].grad = self.grads.grad(p).float()  # fp32: no copy

    def _global_tokens(self, batches: list[dict[str, torch.Tensor]]) -> int:
        local = sum(count_target_tokens(b["labels"]) for b in batches)
        t = torch.tensor([local], dtype=torch.float64, device=self.device)
        self._all_reduce(t, self.layout.dp_group)
        return int(t.item())

    def _reduce_loss(self, loss_sum: torch.Tensor, extra: torch.Tensor | None = None):
        """Sum the last stage's loss over dp, then share it (and `extra`) over the pp group."""
        loss = loss_sum.reshape(1).double()
        if self.layout.is_last_stage:
            self._all_reduce(loss, self.layout.dp_group)
        else:
            loss.zero_()
        vec = loss if extra is None else torch.cat([loss, extra.double()])
        self._all_reduce(vec, self.layout.pp_group)
        return vec

    # -- public ---------------------------------------------------------------------------------
    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over this replica's accumulation batches."""
        self.module.train()
        num_tokens = self._global_tokens(batches)
        self.loss_fn.normalizer = float(max(num_tokens, 1))
        self.loss_fn.scale = self.scaler.scale
        # Zeroed gradient views; each bucket's dp all-reduce starts as soon as the backward
        # has produced its last gradient (one backward per micro-batch per pass).
        self.grads.begin(expected=self.n_microbatches * len(batches))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            loss_sum += self._run_pipeline(batch, grad=True)
        with self.span("dp_all_reduce_wait"):
            self.grads.finish()
        if self._tied_local is not None:
            with self.span("tie_all_reduce"):
                self._all_reduce(self.grads.grad(self._tied_local), self.layout.tie_group)
        self._grads_to_master()
        inv_scale = 1.0 / self.scaler.scale
        sumsq = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, m in zip(self.master.names, self.master.params, strict=True):
            if inv_scale != 1.0:
                m.grad.mul_(inv_scale)
            if name not in self._norm_skip:
                # A BLAS dot per tensor (fp32, ~1e-4 relative at 10^8 elements, like
                # clip_grad_norm_), summed in fp64; far cheaper than an fp64 copy of the grads.
                flat = m.grad.reshape(-1)
                sumsq += torch.dot(flat, flat).double()
        with self.span("pp_reduce_norm_loss"):
            vec = self._reduce_loss(loss_sum, sumsq.reshape(1))
        loss = float(vec[0].item()) / self.scaler.scale
        grad_norm = math.sqrt(vec[1].item()) if math.isfinite(vec[1].item()) else float("inf")
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            if self.max_grad_norm > 0:
                coef = self.max_grad_norm / (grad_norm + 1e-6)
                if coef < 1.0:
                    for m in self.master.params:
                        m.grad.mul_(coef)
            with self.span("optimizer"):
                self.optimizer.step()
                self.master.master_to_model()
        if not skipped:
            # The schedule counts applied updates: a step skipped on fp16 overflow leaves the
            # LR where it was (as Megatron does), so warm-up and decay see only real updates.
            self.scheduler.step()
        self.scaler.update(skipped)
        self.master.zero_grad()
        self.grads.end_step()
        return StepResult(
            loss=loss,
            grad_norm=grad_norm,
            skipped=skipped,
            num_tokens=num_tokens,
            lr=lr,
            loss_scale=self.scaler.scale,
        )

    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict[str, torch.Tensor]]) -> float:
        """Token-mean loss over `batches` (every rank must pass the same number)."""
        self.module.eval()
        batches = list(batches)
        num_tokens = self._global_tokens(batches)
        self.loss_fn.normalizer = float(max(num_tokens, 1))
        self.loss_fn.scale = 1.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            loss_sum += self._run_pipeline(batch, grad=False)
        self.module.train()
        return float(self._reduce_loss(loss_sum)[0].item())
