"""The training run: process groups, stage, data, resume, the step loop, logs and checkpoints.

`run_training(config, rdv)` is what `training/dist_clm_train.py` calls with the checked
`TrainConfig`; one call per process (rank). The layout is branched on once, here, where the stage
is built.
"""

from __future__ import annotations

import contextlib
import datetime
import math
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

from openchatkit.distributed.env import (
    Rendezvous,
    cuda_device_index,
    job_token,
    open_store,
    pin_socket_interfaces,
)
from openchatkit.distributed.layout import ParallelLayout
from openchatkit.distributed.watchdog import PeerWatchdog, uses_agent_store
from openchatkit.errors import UserError
from openchatkit.training import checkpoint as ckpt
from openchatkit.training.config import TrainConfig
from openchatkit.training.engine import TrainEngine
from openchatkit.training.lock import releasing
from openchatkit.training.metrics import (
    MetricsLogger,
    matmul_params,
    model_flops_per_token,
    peak_flops,
)
from openchatkit.training.precision import check_bf16_device, qlora_compute_dtype
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


def _logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for: an NF4 `Params4bit` packs two per byte (its quant state
    keeps the original shape)."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


class Run:
    """Everything one rank holds during training (built by `setup`)."""

    def __init__(self, config: TrainConfig, rdv: Rendezvous):
        self.config = config
        self.rdv = rdv
        self.root = Path(config.checkpoint_path)
        self.layout = ParallelLayout(config.pp, config.dp, rdv.rank)
        self.device = torch.device("cpu")
        self.start_step = 0
        self.watchdog: PeerWatchdog | None = None
        self.save_group = None  # gloo group for checkpoint barriers (distributed runs)
        # Checked before the process group exists (run_training calls its `precheck`).
        self.resume_check = ckpt.ResumeCheck(self.root, rdv.rank, rdv.world_size)

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (a max all-reduce on the gloo save group)."""
        if not self.layout.is_distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.save_group)
        return bool(t.item())

    # -- setup --------------------------------------------------------------------------------
    def init_distributed(self) -> None:
        config = self.config
        pin_socket_interfaces(self.rdv, config.net_interface)
        if config.device == "cuda":
            rdv = self.rdv
            cuda_id = cuda_device_index(
                config.cuda_id, rdv.local_rank, rdv.rank, rdv.world_size, torch.cuda.device_count()
            )
            torch.cuda.set_device(cuda_id)
            self.device = torch.device("cuda", cuda_id)
            check_bf16_device(config.precision, self.device)
            if config.precision == "fp32":
                # TF32 tensor cores for fp32 matmuls (10-bit mantissa products, fp32 sums).
                torch.set_float32_matmul_precision("high")
        if self.layout.is_distributed:
            # Our own store, so that it listens on loopback (or --net-interface), not on every
            # interface as torch's init_method would (distributed/env.py).
            timeout = datetime.timedelta(seconds=config.pg_timeout)
            store = open_store(self.rdv, config.net_interface, timeout, uses_agent_store())
            dist.init_process_group(
                backend=config.dp_backend,
                store=dist.PrefixStore("default_pg", store),  # as torch's init_method does
                rank=self.rdv.rank,
                world_size=self.rdv.world_size,
                timeout=timeout,
                # NCCL binds its communicator to this GPU eagerly instead of guessing it.
                device_id=self.device if config.device == "cuda" else None,
            )
            self.layout.init_groups(config.device, tied=config.model.tie_word_embeddings)
            # Checkpoint barriers on their own CPU group with their own timeout: ranks wait for
            # the slowest writer without tripping --pg-timeout of the NCCL group.
            self.save_group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=config.save_timeout)
            )
            if config.peer_timeout > 0:
                host, port = self.rdv.address
                self.watchdog = PeerWatchdog(
                    host,
                    port,
                    self.rdv.rank,
                    self.rdv.world_size,
                    config.peer_timeout,
                    describe=self.layout.describe_rank,
                    token=job_token(
                        store, self.rdv.rank, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                    ),
                )
                # Its exit skips `finally`: the run lock is released first.
                self.watchdog.on_dead = releasing(self.watchdog.on_dead)
                self.watchdog.start()

    def barrier(self) -> None:
        """Wait for every rank around a checkpoint write (--save-timeout)."""
        if self.layout.is_distributed:
            dist.barrier(group=self.save_group)

    def build(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from openchatkit.models.stage import StageModel

        config, layout = self.config, self.layout
        ckpt.seed_everything(config.seed)
        self.resume_from = self.resume_check.agree(self._any_rank)
        self.meta = ckpt.read_meta(self.resume_from) if self.resume_from else None
        dtype = DTYPES[config.precision]
        layer_range = config.layer_ranges[layout.pp_rank]
        first, last = layout.is_first_stage, layout.is_last_stage
        # LoRA checkpoints hold only adapters: the weights always come from the base model.
        full_weights = self.resume_from if config.lora is None else None
        if self.resume_from is not None:
            check_resume_kind(self.resume_from, config)
        source = full_weights or (config.model_name if config.load_pretrained_model else None)
        if source is not None:
            self.stage = StageModel.from_sharded(
                source, layer_range, first, last, dtype=dtype, device=self.device
            )
        else:
            # Random init: the same seed on every replica of a stage keeps the replicas equal.
            torch.manual_seed(config.seed + layout.pp_rank)
            hf_config = AutoConfig.from_pretrained(config.model_name)
            self.stage = StageModel(
                hf_config, layer_range, first, last, dtype=dtype, device=self.device
            )
            ckpt.seed_everything(config.seed)
        if config.lora is not None:
            from openchatkit.models.lora import apply_lora, load_adapter_into

            if config.load_in_4bit:
                from openchatkit.models.quantize import quantize_linear_4bit

                # QLoRA's compute dtype: bf16 on a GPU with native bf16, also for an fp32 run
                # (the 4-bit linears cast their output back to the input's dtype).
                compute = qlora_compute_dtype(self.device, dtype, config.lora.bias != "none")
                quantize_linear_4bit(
                    self.stage, compute_dtype=compute, keep=config.lora.target_modules
                )
            apply_lora(self.stage, config.lora, seed=config.seed)
            if self.resume_from is not None:
                load_adapter_into(self.stage, self.resume_from, config.lora.bias)
        self.stage.set_activation_checkpointing(config.activation_checkpointing)
        self.engine = TrainEngine(self.stage, layout, config, device=self.device)
        if source is None and self.resume_from is None:
            # The last stage's copy of a randomly initialised tied embedding starts equal to it.
            self.engine.share_tied_init()
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name)
        self.loader = self.make_loader(config.tasks, cycle=True)
        self.eval_batches = self.read_eval_batches() if config.evaluation_steps else []
        if self.meta is not None:
            self.resume()
        self.num_params, self.num_trainable = self.count_params()

    def make_loader(self, tasks, cycle: bool):
        """This rank's loader over the one global packed stream of `tasks`."""
        from openchatkit.data import GlobalBatchLoader, PackedSequenceStream

        config, layout = self.config, self.layout
        stream = PackedSequenceStream(
            list(tasks),
            self.tokenizer,
            config.seq_length,
            seed=config.seed,
            loss_on=config.loss_on,
            reset_position_ids=config.reset_position_ids,
            strict_data=config.strict_data,
            cycle=cycle,
        )
        return GlobalBatchLoader(stream, config.batch_size, layout.dp_rank, layout.dp)

    def read_eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's rows of the first --evaluation-num-batches global batches of the
        evaluation data, read once: every evaluation scores the same batches."""
        config = self.config
        loader = self.make_loader(config.eval_tasks, cycle=False)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) >= config.evaluation_num_batches:
                break
        if not batches:
            raise UserError(
                f"--evaluation-data {config.evaluation_data}: too little data for one batch"
            )
        return batches

    def count_params(self) -> tuple[int, int]:
        """(all, trainable) parameters of the whole model, summed over the pipeline; the last
        stage's copy of a tied embedding counted once."""
        tied = self.stage.tied_copy_names
        params = [(n, p) for n, p in self.stage.named_parameters() if not tied or n != tied[1]]
        local = [
            sum(_logical_numel(p) for _, p in params),
            sum(p.numel() for _, p in params if p.requires_grad),
        ]
        t = torch.tensor(local, dtype=torch.float64, device=self.device)
        if self.layout.pp_group is not None:
            dist.all_reduce(t, group=self.layout.pp_group)
        return int(t[0].item()), int(t[1].item())

    def resume(self) -> None:
        meta, folder, layout, config = self.meta, self.resume_from, self.layout, self.config
        states, masters = ckpt.load_stage_states(folder)
        missing = self.engine.load_state_dict(states, masters)
        same = _optimizer_family(config.optimizer) == _optimizer_family(meta["args"]["optimizer"])
        if missing and meta["step"] > 0 and same:
            logger.warning(
                "no saved optimizer state for {} parameters, e.g. {}", len(missing), missing[0]
            )
        self.engine.load_schedule_state(meta)
        self.loader.load_state_dict(meta["data"])
        same_layout = meta["layout"] == {"pp": layout.pp, "dp": layout.dp}
        rng = ckpt.load_rank_rng(folder, layout.rank) if same_layout else None
        if rng is not None:
            try:
                ckpt.set_rng_state(rng)
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
                logger.warning("{}: malformed RNG state for rank {} ({})", folder, layout.rank, err)
                rng = None
        if rng is None:
            if same_layout:
                logger.warning(
                    "{}: no RNG state for rank {}; reseeding, so the run is no longer "
                    "bit-identical to an uninterrupted one",
                    folder,
                    layout.rank,
                )
            ckpt.seed_everything(config.seed + meta["step"] * 1000 + layout.rank)
        saved_seq = meta.get("args", {}).get("seq_length")
        if saved_seq is not None and saved_seq != config.seq_length:
            logger.warning(
                "resuming with --seq-length {}; the checkpoint was trained with {} (the data "
                "stream restarts its packing at the new length)",
                config.seq_length,
                saved_seq,
            )
        self.start_step = int(meta["step"])
        if meta["global_batch_sequences"] != config.global_batch_sequences:
            logger.warning(
                "resuming with a global batch of {} sequences; the checkpoint used {}",
                config.global_batch_sequences,
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
        from openchatkit.models.lora.checkpoint import save_adapter_checkpoint
        from openchatkit.models.stage import save_stage

        layout, rank0, config = self.layout, self.rdv.rank == 0, self.config
        if rank0:
            ckpt.prepare_temp(self.root, step)
        self.barrier()
        tmp = ckpt.temp_dir(self.root, step)
        if layout.dp_rank == 0:
            if config.lora is None:
                save_stage(self.stage, tmp, write_metadata=layout.is_first_stage)
            else:
                save_adapter_checkpoint(
                    self.stage,
                    tmp,
                    layout.pp_rank,
                    config.lora,
                    config.model_name,
                    config.tokenizer_name,
                )
            state, masters = self.engine.state_dict()
            ckpt.write_stage_state(tmp, layout.pp_rank, state, masters)
        ckpt.write_rank_state(tmp, layout.rank)
        maybe_fault("save", step, self.rdv.rank)
        self.barrier()
        ckpt.hash_share(tmp, self.rdv.rank, self.rdv.world_size)  # sizes + sha256 for meta.json
        self.barrier()
        if rank0:
            meta = {
                "step": step,
                "layout": {"pp": layout.pp, "dp": layout.dp},
                "precision": config.precision,
                **self.engine.schedule_state(),
                "data": self.loader.state_dict(),
                "args": config.flags(),
                **config.summary(),
            }
            final = ckpt.publish(self.root, step, meta, config.num_checkpoints)
            logger.info("saved {}", final)
        self.barrier()
        # The next save copies manifest fields and tokenizer files from the stage's source
        # folder; a resumed run's source checkpoint may be gone by then (--num-checkpoints).
        if config.lora is None:  # a LoRA stage keeps the base model as its source
            self.stage.source_folder = ckpt.checkpoint_dir(self.root, step)

    # -- loop ---------------------------------------------------------------------------------
    def train(self) -> int:
        config, layout = self.config, self.layout
        rank0 = self.rdv.rank == 0
        summary = config.summary()
        metrics = MetricsLogger(
            self.root,
            config.train_log_backend,
            config.project_name,
            config=config.flags() | summary,
            enabled=rank0,
        )
        if rank0:
            logger.info(
                "{} | {} params, {} trainable{} | {} micro-batches of {} per pass, global "
                "batch {} sequences ({} tokens) per step, {}",
                layout.describe(),
                f"{self.num_params:,}",
                f"{self.num_trainable:,}",
                f" (LoRA r={config.lora.r})" if config.lora else "",
                config.num_microbatches,
                config.micro_batch_size,
                config.global_batch_sequences,
                config.tokens_per_step,
                config.precision,
            )
        if self.start_step > 0:
            # Steps after the checkpoint were logged by the run that died: readers (and
            # tools/plot_metrics.py) keep the records after this mark for those steps.
            metrics.log({"kind": "resume", "step": self.start_step, "from": str(self.resume_from)})
        profiler = None
        if config.profiling == "tidy_profiling":
            profiler = StepProfiler(
                self.root,
                layout.rank,
                self.start_step + 1,
                config.profile_steps,
                cuda=config.device == "cuda",
            )
            self.engine.enable_tracing(profiler)
        peak = peak_flops(config.device, config.precision)  # fp32: the TF32 peak
        shape = config.model
        flops_tok = model_flops_per_token(
            matmul_params(
                self.num_params, shape.vocab_size, shape.hidden_size, shape.tie_word_embeddings
            ),
            shape.num_layers,
            shape.hidden_size,
            config.seq_length,
            # LoRA: a frozen base does no weight-gradient work (4 FLOPs per weight, not 6).
            trainable_params=self.num_trainable if config.lora is not None else None,
        )
        last = config.total_steps
        if config.stop_after_steps is not None:
            last = min(last, self.start_step + config.stop_after_steps)
        from openchatkit.data.packing import PrefetchingLoader

        # From here the batches are read ahead in a thread; save() asks it for the data state.
        self.loader = PrefetchingLoader(self.loader)
        try:
            for step in range(self.start_step + 1, last + 1):
                maybe_fault("step", step, self.rdv.rank)
                if profiler:
                    profiler.before_step(step)
                t0 = time.perf_counter()
                batches = [next(self.loader) for _ in range(config.gradient_accumulate_step)]
                result = self.engine.train_step(batches)
                if config.device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if profiler:
                    profiler.after_step(step, final=step == last)
                tokens_per_s = config.tokens_per_step / dt
                record: dict[str, Any] = {
                    "kind": "train",
                    "step": step,
                    "total_steps": config.total_steps,
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
                # A checkpoint due at this step is written before the evaluation, so nothing
                # that fails after it can cost the step's weights.
                if (config.checkpoint_steps and step % config.checkpoint_steps == 0) or (
                    step == config.total_steps
                ):
                    self.save(step)
                if config.evaluation_steps and step % config.evaluation_steps == 0:
                    eval_loss = self.engine.evaluate(iter(self.eval_batches))
                    metrics.log({"kind": "eval", "step": step, "eval_loss": eval_loss})
        finally:
            self.loader.close()
            metrics.close()
        return 0


def check_resume_kind(folder: Path, config: TrainConfig) -> None:
    """Refuse to resume a LoRA run from full weights or the other way round, adapters trained
    on another base model (openchatkit/models/lora/checkpoint.py), or optimizer state another
    `--optimizer` cannot take (one line naming both)."""
    from openchatkit.models.lora.checkpoint import check_lora_resume

    check_lora_resume(
        folder, config.lora, config.model_name, f"--checkpoint-path {config.checkpoint_path}"
    )
    # Last, so a checkpoint of the wrong kind gets that advice first.
    saved_optimizer = ckpt.read_meta(folder).get("args", {}).get("optimizer")
    if saved_optimizer and _optimizer_family(saved_optimizer) != _optimizer_family(
        config.optimizer
    ):
        # torch's AdamW keeps exp_avg / exp_avg_sq, bitsandbytes' 8-bit AdamW quantized
        # state1 / state2: either would fail with a KeyError at the first step.
        raise UserError(
            f"--optimizer {config.optimizer}: {folder.name} holds {saved_optimizer}'s state, "
            f"which {config.optimizer} cannot take; resume with --optimizer {saved_optimizer} "
            "or use a new --checkpoint-path"
        )


def _optimizer_family(name: str) -> str:
    """Optimizers that share a state layout: the paged 8-bit AdamW is the 8-bit one."""
    from openchatkit.training.optim import EIGHT_BIT

    return "8bit-adam" if name in EIGHT_BIT else name


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


def run_training(config: TrainConfig, rdv: Rendezvous) -> int:
    """Train on this rank; returns the exit code."""
    run = Run(config, rdv)
    clean, lost = False, None
    try:
        run.resume_check.precheck()
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
