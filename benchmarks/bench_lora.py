"""LoRA on CPU: full fine-tuning against LoRA r=16 in our trainer, and ours against HF Trainer + peft.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same packed batches (data/OIG-sample),
sequence length, batch, AdamW and grad clipping. Each side runs in its own child process (so its
peak RSS is its own), the sides alternating round by round:
- full:    our `TrainEngine`, every weight trained;
- lora:    the same engine with `--lora-r 16 --lora-alpha 32` on q/k/v/o (dropout 0.05);
- hf-peft: `transformers.Trainer` on `peft.get_peft_model` with the same LoraConfig;
- lora-dp2, hf-peft-dp2 (opt-in): the same two as 2 data-parallel processes of 1 thread on gloo,
  each on half of every batch (ours: pp=1 x dp=2; HF: DDP through accelerate). A step lasts as
  long as its slower rank; CPU time sums both.
Reported per side: median step time (wall and CPU), tokens/s, peak RSS, optimizer-state bytes and
checkpoint bytes (what a resumable checkpoint of that side holds: ours = model or adapter files +
optimizer state; HF = `save_pretrained` of the adapter + optimizer.pt). For the speed ratio
against the peer alone, `bench_lora_interleaved.py` is steadier: both sides in one process,
taking turns step by step.

    python benchmarks/bench_lora.py                  # ~6 min on 2 cores
    python benchmarks/bench_lora.py --rounds 1 --steps 2
    python benchmarks/bench_lora.py --loss-on bot    # chat SFT: loss on the bot turns only
    python benchmarks/bench_lora.py --sides lora,hf-peft,lora-dp2,hf-peft-dp2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("full", "lora", "hf-peft", "lora-dp2", "hf-peft-dp2")

CHILD = r"""
import json, os, resource, socket, statistics, sys, tempfile, time
from pathlib import Path
import torch
side, seq, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
loss_on = sys.argv[5]
dp = 2 if side.endswith("-dp2") else 1  # -dp2: two processes of one thread, half the batch each
from transformers import AutoTokenizer
from openchatkit.data import GlobalBatchLoader, PackedSequenceStream
from openchatkit.models.embedded import ensure_embedded_model
from openchatkit.models.pretrained import prepare_pretrained
hf_dir, sharded = ensure_embedded_model(), prepare_pretrained("SmolLM2-135M-Instruct")
tok = AutoTokenizer.from_pretrained(hf_dir)
stream = PackedSequenceStream(os.environ["BENCH_DATA"], tok, seq, seed=0, loss_on=loss_on)
loader = GlobalBatchLoader(stream, batch)
batches = [next(loader) for _ in range(steps + 1)]
R, ALPHA, DROP = 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
def state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))
def dir_bytes(d):
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())

def ours(rank, tmp, times):
    from openchatkit.cli.train import config_with_defaults
    from openchatkit.distributed.layout import ParallelLayout
    from openchatkit.models.lora import apply_lora, save_adapter_stage
    from openchatkit.models.stage import StageModel, save_stage
    from openchatkit.training import checkpoint as ckpt
    from openchatkit.training.config import read_model_shape
    from openchatkit.training.engine import TrainEngine
    flags = dict(lr=2e-4, batch_size=batch, micro_batch_size=batch // dp, total_steps=10_000,
                 loss_on=loss_on, data_group_size=dp)
    if side.startswith("lora"):
        flags.update(lora_r=R, lora_alpha=ALPHA, lora_dropout=DROP)
    config = config_with_defaults(read_model_shape(sharded), **flags)
    layout = ParallelLayout(1, dp, rank)
    layout.init_groups("cpu")
    stage = StageModel.from_sharded(sharded, range(30), True, True, dtype=torch.float32)
    if config.lora is not None:
        apply_lora(stage, config.lora, seed=0)
    engine = TrainEngine(stage, layout, config, device=torch.device("cpu"))
    rows = batch // dp  # replica r takes rows [r*rows, (r+1)*rows) of the global batch
    for b in batches:
        mine = {k: v[rank * rows:(rank + 1) * rows] for k, v in b.items()}
        t0, c0 = time.perf_counter(), time.process_time()
        engine.train_step([mine])
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    if config.lora is None:
        save_stage(stage, tmp)
    else:
        save_adapter_stage(stage, Path(tmp), 0, "none")
    ckpt.write_stage_state(Path(tmp), 0, *engine.state_dict())
    return state_bytes(engine.optimizer), tmp

def peer(rank, tmp, times):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROP,
                                             target_modules=TARGETS, bias="none",
                                             task_type="CAUSAL_LM"))
    rows = [{k: b[k][i] for k in ("input_ids", "labels", "position_ids")}
            for b in batches for i in range(b["input_ids"].shape[0])]
    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        def on_step_end(self, *a, **k):
            times.append((time.perf_counter() - self.t0, time.process_time() - self.c0))
    # Under DDP accelerate shards the sequential batches: rank r takes every dp-th batch of
    # batch/dp rows, so one step covers the same global batch as one process.
    args = TrainingArguments(output_dir=tmp + "/hf", per_device_train_batch_size=batch // dp,
        max_steps=len(batches), learning_rate=2e-4, lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch",
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, ddp_backend="gloo" if dp > 1 else None)
    collate = lambda items: {k: torch.stack([x[k] for x in items]) for k in items[0]}
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                      callbacks=[Timer()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    assert trainer.args.world_size == dp, trainer.args.world_size
    trainer.train()
    assert trainer.state.global_step == len(batches), trainer.state.global_step
    opt_bytes = state_bytes(trainer.optimizer)
    model.save_pretrained(tmp + "/ckpt")
    torch.save(trainer.optimizer.state_dict(), tmp + "/ckpt/optimizer.pt")
    return opt_bytes, tmp + "/ckpt"

def run(rank, port, out):
    if dp > 1:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(dp), LOCAL_WORLD_SIZE=str(dp))
        if not side.startswith("hf"):
            torch.distributed.init_process_group("gloo", rank=rank, world_size=dp)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        opt_bytes, folder = (peer if side.startswith("hf") else ours)(rank, tmp, times)
        timed = times[2:]  # the first steps fault in memory and warm caches
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "wall": [t for t, _ in timed], "cpu": [c for _, c in timed],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "opt_bytes": opt_bytes, "ckpt_bytes": dir_bytes(folder)}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

with tempfile.TemporaryDirectory() as out:
    if dp == 1:
        run(0, 0, out)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.start_processes(run, args=(port, out), nprocs=dp, join=True,
                                              start_method="fork")
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(dp)]
# A step lasts as long as its slowest rank; CPU time is every rank's, summed.
wall = [max(w) for w in zip(*(r["wall"] for r in ranks))]
cpu = [sum(c) for c in zip(*(r["cpu"] for r in ranks))]
print(json.dumps({
    "wall": statistics.median(wall), "cpu": statistics.median(cpu),
    "rss_mb": sum(r["rss_mb"] for r in ranks),
    "opt_bytes": sum(r["opt_bytes"] for r in ranks) / dp,
    "ckpt_bytes": ranks[0]["ckpt_bytes"]}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per round and side (2 untimed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--sides",
        default="full,lora,hf-peft",
        help=f"comma-separated subset of {','.join(SIDES)} (-dp2: 2 processes x 1 thread)",
    )
    p.add_argument(
        "--loss-on",
        choices=["all", "bot"],
        default="all",
        help="bot: labels -100 on the human turns (~57%% of tokens here), the same for every side",
    )
    return p.parse_args(argv)


def child_env() -> dict[str, str]:
    """The environment of a benchmark child (also bench_lora_interleaved.py's)."""
    return {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "BENCH_DATA": str(REPO / "data" / "OIG-sample" / "train.jsonl"),
        # glibc hands every large block back to the OS when freed, so each step faults its
        # gradients and activations in again; on a VM whose page faults are slow that cost
        # swamped the work (20 s instead of 3.4 s per full step). Same for every side.
        "MALLOC_MMAP_THRESHOLD_": "4294967296",
        "MALLOC_TRIM_THRESHOLD_": "68719476736",
        "MALLOC_TOP_PAD_": "1073741824",
    }


def child(side: str, args: argparse.Namespace) -> dict:
    env = child_env()
    if side.endswith("-dp2"):
        # One thread per rank on both sides (accelerate's multi-CPU set-up would otherwise
        # pick its own thread count from the physical cores).
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-c", CHILD, side, str(args.seq_length), str(args.batch_size)]
    cmd += [str(args.steps), args.loss_on]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    tokens = args.seq_length * args.batch_size
    print(
        f"SmolLM2-135M-Instruct fp32 on CPU ({os.cpu_count()} cores) | seq {args.seq_length} x "
        f"batch {args.batch_size} = {tokens} tokens/step | LoRA r=16 alpha 32 on q/k/v/o | "
        f"loss on {args.loss_on}"
    )
    sides = [s for s in SIDES if s in args.sides.split(",")]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else list(reversed(sides)):
            runs[side].append(child(side, args))
            x = runs[side][-1]
            print(
                f"round {r + 1} {side:8s} {x['wall']:.3f} s/step wall {x['cpu']:.3f} CPU s "
                f"RSS {x['rss_mb']:.0f} MB",
                flush=True,
            )

    def med(side: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[side])

    def spread(side: str, key: str) -> str:
        values = [x[key] for x in runs[side]]
        return f"{min(values):.3f}-{max(values):.3f}"

    print(f"\n{'side':8s} {'tokens/s':>9s} {'s/step (min-max)':>20s} {'RSS MB':>7s} "
          f"{'optim state':>12s} {'checkpoint':>12s}")  # fmt: skip
    for side in sides:
        print(
            f"{side:8s} {tokens / med(side, 'wall'):9.1f} {med(side, 'wall'):8.3f} "
            f"({spread(side, 'wall')}) {med(side, 'rss_mb'):7.0f} "
            f"{med(side, 'opt_bytes') / 1e6:10.2f}MB {med(side, 'ckpt_bytes') / 1e6:10.2f}MB"
        )
    if {"full", "lora"} <= set(sides):
        speed = med("full", "wall") / med("lora", "wall")
        print(
            f"LoRA vs full: tokens/s {speed:.2f}x (goal >= 1.2x), checkpoint "
            f"{med('full', 'ckpt_bytes') / med('lora', 'ckpt_bytes'):.0f}x smaller, optimizer "
            f"state {med('full', 'opt_bytes') / med('lora', 'opt_bytes'):.0f}x smaller (goals "
            f">= 50x), RSS {med('full', 'rss_mb') / med('lora', 'rss_mb'):.2f}x"
        )
    pairs = [("lora", "hf-peft"), ("lora-dp2", "hf-peft-dp2"), ("lora-dp2", "hf-peft")]
    for a, b in pairs:
        if {a, b} <= set(sides):
            wall, cpu = med(b, "wall") / med(a, "wall"), med(b, "cpu") / med(a, "cpu")
            print(f"{a} vs {b}: tokens/s {wall:.2f}x wall, {cpu:.2f}x CPU time (goal >= 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
