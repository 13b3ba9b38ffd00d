"""The training run: process groups, stage, data, resume, the step loop, logs and checkpoints.

`run_training(args)` is what `training/dist_clm_train.py` calls after validating its flags; one
call per process (rank). The layout is branched on once, here, where the stage is built.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger

from openchatkit.distributed.env import Rendezvous, cuda_device_index
from openchatkit.distributed.layout import ParallelLayout
from openchatkit.distributed.watchdog import PeerWatchdog
from openchatkit.errors import UserError
from openchatkit.training import checkpoint as ckpt
from openchatkit.training.args import ModelShape, derived_summary
from openchatkit.training.engine import TrainEngine
from openchatkit.training.metrics import (
    MetricsLogger,
    matmul_params,
    model_flops_per_token,
    peak_flops,
)
from openchatkit.training.optim import (
    build_optimizer,
    build_scheduler,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)
from openchatkit.training.precision import LossScaler
from openchatkit.training.profiling import StepProfiler

# Error messages from gloo, NCCL or the TCP store that mean another rank is gone or stuck. Not
# every NCCL error: a rank's own CUDA fault (ncclUnhandledCudaError, out of memory, invalid
# usage) is its own error and is reported at once, not as "lost contact".
_PEER_LOST = re.compile(
    r"Connection (reset|closed)|Broken pipe|timed? ?out|waiting for clients|peer|"
    r"ncclRemoteError|remote process exit|communicator was aborted|NCCL_ERROR_REMOTE",
    re.I,
)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def precision_name(args: argparse.Namespace) -> str:
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


class Run:
    """Everything one rank holds during training (built by `setup`)."""

    def __init__(self, args: argparse.Namespace, rdv: Rendezvous, shape: ModelShape):
        self.args = args
        self.rdv = rdv
        self.shape = shape
        self.root = Path(args.checkpoint_path)
        self.layout = ParallelLayout(args.pipeline_group_size, args.data_group_size, rdv.rank)
        self.device = torch.device("cpu")
        self.start_step = 0
        self.watchdog: PeerWatchdog | None = None

    # -- setup --------------------------------------------------------------------------------
    def init_distributed(self) -> None:
        args = self.args
        if args.net_interface:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", args.net_interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", args.net_interface)
        if args.device == "cuda":
            rdv = self.rdv
            cuda_id = cuda_device_index(
                args.cuda_id, rdv.local_rank, rdv.rank, rdv.world_size, torch.cuda.device_count()
            )
            torch.cuda.set_device(cuda_id)
            self.device = torch.device("cuda", cuda_id)
        if self.layout.is_distributed:
            dist.init_process_group(
                backend=args.dp_backend,
                init_method=self.rdv.init_method,
                rank=self.rdv.rank,
                world_size=self.rdv.world_size,
                timeout=datetime.timedelta(seconds=args.pg_timeout),
            )
            self.layout.init_groups(tied=self.shape.tie_word_embeddings)
            if args.peer_timeout > 0:
                host, port = self.rdv.address
                self.watchdog = PeerWatchdog(
                    host,
                    port,
                    self.rdv.rank,
                    self.rdv.world_size,
                    args.peer_timeout,
                    describe=self.layout.describe_rank,
                ).start()

    def barrier(self) -> None:
        if self.layout.is_distributed:
            dist.barrier()

    def build(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from openchatkit.data import GlobalBatchLoader, PackedSequenceStream
        from openchatkit.models.stage import StageModel

        args, layout = self.args, self.layout
        ckpt.seed_everything(args.seed)
        self.resume_from = ckpt.find_latest(self.root)
        self.meta = ckpt.read_meta(self.resume_from) if self.resume_from else None
        dtype = DTYPES[precision_name(args)]
        layer_range = args.layer_ranges[layout.pp_rank]
        first, last = layout.is_first_stage, layout.is_last_stage
        source = self.resume_from or (args.model_name if args.load_pretrained_model else None)
        if source is not None:
            self.stage = StageModel.from_sharded(
                source, layer_range, first, last, dtype=dtype, device=self.device
            )
        else:
            # Random init: the same seed on every replica of a stage keeps the replicas equal.
            torch.manual_seed(args.seed + layout.pp_rank)
            config = AutoConfig.from_pretrained(args.model_name)
            self.stage = StageModel(
                config, layer_range, first, last, dtype=dtype, device=self.device
            )
            ckpt.seed_everything(args.seed)
        self.stage.set_activation_checkpointing(args.activation_checkpointing)
        tied = (self.stage.tied_embed_param, self.stage.tied_head_param)
        tied_names = None
        if self.shape.tie_word_embeddings and layout.pp > 1:
            embed_name = tied[0] or f"embed.{self.stage.arch.embed_weight}"
            head_name = tied[1] or f"head.{self.stage.arch.lm_head_weight}"
            tied_names = (embed_name, head_name)
        self.alias = {tied_names[1]: tied_names[0]} if tied_names else {}
        self.scaler = LossScaler(args.fp16, args.initial_loss_scale, args.loss_scale_window)
        num_micro = derived_summary(args)["num_microbatches"]
        self.engine = TrainEngine(
            self.stage,
            layout,
            device=self.device,
            n_microbatches=num_micro,
            pp_mode=args.pp_mode,
            tied_names=tied_names,
            loss_scaler=self.scaler,
            max_grad_norm=args.max_grad_norm,
        )
        if source is None and tied_names is not None:
            # The last stage's copy of a randomly initialised tied embedding starts equal to it.
            params = dict(self.stage.named_parameters())
            local = params.get(tied_names[0]) if first else params.get(tied_names[1])
            if local is not None:
                dist.broadcast(local.data, src=layout.first_stage_rank, group=layout.tie_group)
                self.engine.master = type(self.engine.master)(
                    [(n, p) for n, p in self.stage.named_parameters() if p.requires_grad]
                )
        self.optimizer = build_optimizer(
            self.engine.master.params, args.optimizer, args.lr, args.weight_decay
        )
        self.scheduler = build_scheduler(self.optimizer, args.warmup_steps, args.total_steps)
        self.engine.attach_optimizer(self.optimizer, self.scheduler)
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
        stream = PackedSequenceStream(
            args.task_name,
            self.tokenizer,
            args.seq_length,
            seed=args.seed,
            loss_on=args.loss_on,
            reset_position_ids=args.reset_position_ids,
        )
        self.loader = GlobalBatchLoader(stream, args.batch_size, layout.dp_rank, layout.dp)
        if self.meta is not None:
            self.resume()
        self.num_params = self.count_params()

    def count_params(self) -> int:
        """Parameters of the whole model (sum over the pipeline; a tied copy counted once)."""
        local = sum(p.numel() for n, p in self.stage.named_parameters() if n not in self.alias)
        t = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        if self.layout.pp_group is not None:
            dist.all_reduce(t, group=self.layout.pp_group)
        return int(t.item())

    def resume(self) -> None:
        meta, folder, layout = self.meta, self.resume_from, self.layout
        states, masters = ckpt.load_stage_states(folder)
        names = self.engine.master.names
        missing = load_optimizer_state_by_name(self.optimizer, names, states, self.alias)
        if missing and meta["step"] > 0 and self.args.optimizer == meta["args"]["optimizer"]:
            logger.warning(
                "no saved optimizer state for {} parameters, e.g. {}", len(missing), missing[0]
            )
        self.engine.master.load_master_state(masters, self.alias)
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(
            self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr
        self.scaler.load_state_dict(meta["loss_scale"])
        self.loader.load_state_dict(meta["data"])
        same_layout = meta["layout"] == {"pp": layout.pp, "dp": layout.dp}
        rng = ckpt.load_rank_rng(folder, layout.rank) if same_layout else None
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:
            ckpt.seed_everything(self.args.seed + meta["step"] * 1000 + layout.rank)
        self.start_step = int(meta["step"])
        if meta["global_batch_sequences"] != derived_summary(self.args)["global_batch_sequences"]:
            logger.warning(
                "resuming with a global batch of {} sequences; the checkpoint used {}",
                derived_summary(self.args)["global_batch_sequences"],
                meta["global_batch_sequences"],
            )
        if self.rdv.rank == 0:
            logger.info(
                "resumed from {} (step {}, saved under pp={} dp={})",
                folder,
                self.start_step,
                meta["layout"]["pp"],
                meta["layout"]["dp"],
            )

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, step: int) -> None:
        from openchatkit.models.stage import save_stage

        layout, rank0 = self.layout, self.rdv.rank == 0
        if rank0:
            ckpt.prepare_temp(self.root, step)
        self.barrier()
        tmp = ckpt.temp_dir(self.root, step)
        if layout.dp_rank == 0:
            save_stage(self.stage, tmp, write_metadata=layout.is_first_stage)
            skip = set(self.alias)  # the tied copy's state is saved under the embedding's name
            state = optimizer_state_by_name(self.optimizer, self.engine.master.names, skip)
            masters = {k: v for k, v in self.engine.master.master_state().items() if k not in skip}
            ckpt.write_stage_state(tmp, layout.pp_rank, state, masters)
        ckpt.write_rank_state(tmp, layout.rank)
        maybe_fault("save", step, self.rdv.rank)
        self.barrier()
        if rank0:
            meta = {
                "step": step,
                "layout": {"pp": layout.pp, "dp": layout.dp},
                "precision": precision_name(self.args),
                "scheduler": self.scheduler.state_dict(),
                "loss_scale": self.scaler.state_dict(),
                "data": self.loader.state_dict(),
                "args": {k: v for k, v in vars(self.args).items() if _jsonable(v)},
                **derived_summary(self.args),
            }
            final = ckpt.publish(self.root, step, meta, self.args.num_checkpoints)
            logger.info("saved {}", final)
        self.barrier()

    # -- loop ---------------------------------------------------------------------------------
    def evaluate(self) -> float:
        from openchatkit.data import GlobalBatchLoader, PackedSequenceStream

        args, layout = self.args, self.layout
        stream = PackedSequenceStream(
            args.evaluation_data,
            self.tokenizer,
            args.seq_length,
            seed=args.seed,
            loss_on=args.loss_on,
            reset_position_ids=args.reset_position_ids,
            cycle=False,
        )
        loader = GlobalBatchLoader(stream, args.batch_size, layout.dp_rank, layout.dp)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) >= args.evaluation_num_batches:
                break
        if not batches:
            raise UserError(
                f"--evaluation-data {args.evaluation_data}: too little data for one batch"
            )
        return self.engine.evaluate(iter(batches))

    def train(self) -> int:
        args, layout = self.args, self.layout
        rank0 = self.rdv.rank == 0
        summary = derived_summary(args)
        metrics = MetricsLogger(
            self.root,
            args.train_log_backend,
            args.project_name,
            config={k: v for k, v in vars(args).items() if _jsonable(v)} | summary,
            enabled=rank0,
        )
        if rank0:
            logger.info(
                "{} | {} params | {} micro-batches of {} per pass, global batch {} sequences "
                "({} tokens) per step, {}",
                layout.describe(),
                f"{self.num_params:,}",
                summary["num_microbatches"],
                args.micro_batch_size,
                summary["global_batch_sequences"],
                summary["tokens_per_step"],
                precision_name(args),
            )
        profiler = None
        if args.profiling == "tidy_profiling":
            profiler = StepProfiler(self.root, layout.rank, self.start_step + 1, args.profile_steps)
            self.engine.enable_tracing(profiler)
        peak = peak_flops(args.device)
        shape = self.shape
        flops_tok = model_flops_per_token(
            matmul_params(
                self.num_params, shape.vocab_size, shape.hidden_size, shape.tie_word_embeddings
            ),
            shape.num_layers,
            shape.hidden_size,
            args.seq_length,
        )
        last = args.total_steps
        if args.stop_after_steps is not None:
            last = min(last, self.start_step + args.stop_after_steps)
        try:
            for step in range(self.start_step + 1, last + 1):
                maybe_fault("step", step, self.rdv.rank)
                if profiler:
                    profiler.before_step(step)
                t0 = time.perf_counter()
                batches = [next(self.loader) for _ in range(args.gradient_accumulate_step)]
                result = self.engine.train_step(batches)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if profiler:
                    profiler.after_step(step, final=step == last)
                tokens_per_s = summary["tokens_per_step"] / dt
                record: dict[str, Any] = {
                    "kind": "train",
                    "step": step,
                    "total_steps": args.total_steps,
                    "loss": result.loss,
                    "lr": result.lr,
                    "grad_norm": result.grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "step_time_s": dt,
                    "num_target_tokens": result.num_tokens,
                    "loss_scale": result.loss_scale,
                    "skipped": result.skipped,
                }
                if peak is not None:
                    record["mfu"] = tokens_per_s * flops_tok / (peak * layout.world_size)
                metrics.log(record)
                if args.evaluation_steps and step % args.evaluation_steps == 0:
                    eval_loss = self.evaluate()
                    metrics.log({"kind": "eval", "step": step, "eval_loss": eval_loss})
                if (args.checkpoint_steps and step % args.checkpoint_steps == 0) or (
                    step == args.total_steps
                ):
                    self.save(step)
        finally:
            metrics.close()
        return 0


def maybe_fault(point: str, step: int, rank: int) -> None:
    """Test hook: OPENCHATKIT_FAULT="save:4@1" SIGKILLs rank 1 while it saves step 4
    ("step:5" kills every rank at the start of step 5; "step:3@3/stop" freezes rank 3 with
    SIGSTOP, a hung peer), to prove resume after a real kill and the peer watchdog."""
    spec = os.environ.get("OPENCHATKIT_FAULT")
    if not spec:
        return
    where, _, rest = spec.partition("@")
    who, _, action = rest.partition("/")
    if where == f"{point}:{step}" and (not who or int(who) == rank):
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None)))


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO (OPENCHATKIT_LOG_LEVEL overrides), the others only warnings; each
    line names its rank."""
    level = os.environ.get("OPENCHATKIT_LOG_LEVEL", "INFO") if rank == 0 else "WARNING"
    logger.remove()
    logger.add(
        sys.stderr,
        level=level,
        format="<green>{time:HH:mm:ss}</green> | {level: <7} | rank " + str(rank) + " | {message}",
    )


def run_training(args: argparse.Namespace, rdv: Rendezvous, shape: ModelShape) -> int:
    """Train on this rank; returns the exit code."""
    setup_logging(rdv.rank)
    run = Run(args, rdv, shape)
    clean, lost = False, None
    try:
        run.init_distributed()
        run.build()
        code = run.train()
        clean = True
        return code
    except BaseException as err:
        # A peer that died (or hung past --pg-timeout) surfaces here as a gloo/NCCL/store
        # error; the watchdogs agree on which rank it was (within --peer-timeout), and this
        # rank says so in one line and exits non-zero. Any other error is this rank's own:
        # the others hear of it through the watchdog, and it propagates.
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        peer_lost = (
            isinstance(err, RuntimeError)  # dist.DistError is one
            and run.layout.is_distributed
            and _PEER_LOST.search(first)
        )
        if not peer_lost:
            if run.watchdog is not None:
                run.watchdog.report_failure(f"{type(err).__name__}: {first}")
            raise
        named = run.watchdog.name_lost_peer() if run.watchdog is not None else None
        lost = named or (
            f"rank {rdv.rank} ({run.layout.describe()}): lost contact with another rank, "
            f"stopping: {first[:300]}"
        )
        return 1
    finally:
        if run.watchdog is not None:
            run.watchdog.stop(clean)
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        if lost:
            # Last, after the teardown's own warnings, so it is the line a user sees.
            print(lost, file=sys.stderr, flush=True)
