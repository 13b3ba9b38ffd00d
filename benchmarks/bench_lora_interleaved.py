"""Ours vs HF Trainer + peft for LoRA on CPU, step by step in one process.

`bench_lora.py` runs each side in its own child process, the sides alternating by round; on a
shared 2-core VM the round-to-round drift (±15 %) is larger than the difference between the
sides. Here both live in one process and take turns: HF's own `Trainer.train()` runs its loop,
and a callback runs one step of our engine on the same batch beside each of its steps, after it
on even steps and before it on odd ones. HF's timed window (`on_step_begin` to `on_step_end`)
holds its forward, backward, clipping, optimizer, scheduler and zero_grad; its batch is fetched
before it, as ours are built before the loop. The ratio is taken per pair (HF step i over our step i) and its median reported
with the spread. An extra side of our engine shows what its CPU LoRA dropout is worth:
`--also-torch-dropout` puts peft's `nn.Dropout` back (no `LoraDropout`,
openchatkit/models/lora/dropout.py).

Same model (embedded SmolLM2-135M-Instruct, fp32), same packed batches in the same order, LoRA
r=16 alpha 32 dropout 0.05 on q/k/v/o, AdamW lr 2e-4, clip 1.0, threads as the environment says.

    OMP_NUM_THREADS=2 python benchmarks/bench_lora_interleaved.py              # ~3 min on 2 cores
    OMP_NUM_THREADS=2 python benchmarks/bench_lora_interleaved.py --runs 3 --also-torch-dropout
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
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_lora beside this file

from bench_lora import child_env  # noqa: E402

CHILD = r"""
import json, os, sys, tempfile, time
import torch
from torch import nn
seq, batch, steps, loss_on = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
extra = [s for s in sys.argv[5].split(",") if s]
from transformers import AutoTokenizer
from openchatkit.data import GlobalBatchLoader, PackedSequenceStream
from openchatkit.models.embedded import ensure_embedded_model
from openchatkit.models.pretrained import prepare_pretrained
hf_dir, sharded = ensure_embedded_model(), prepare_pretrained("SmolLM2-135M-Instruct")
tok = AutoTokenizer.from_pretrained(hf_dir)
stream = PackedSequenceStream(os.environ["BENCH_DATA"], tok, seq, seed=0, loss_on=loss_on)
loader = GlobalBatchLoader(stream, batch)
batches = [next(loader) for _ in range(steps)]
R, ALPHA, DROP, TARGETS = 16, 32, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"]

# Ours: the trainer's engine, one process (pp=1 x dp=1).
from openchatkit.cli.train import config_with_defaults
from openchatkit.distributed.layout import ParallelLayout
from openchatkit.models.lora.dropout import LoraDropout
from openchatkit.models.lora import apply_lora
from openchatkit.models.stage import StageModel
from openchatkit.training.config import read_model_shape
from openchatkit.training.engine import TrainEngine
config = config_with_defaults(read_model_shape(sharded), lr=2e-4, batch_size=batch,
                              micro_batch_size=batch, total_steps=10_000, loss_on=loss_on,
                              lora_r=R, lora_alpha=ALPHA, lora_dropout=DROP)
layout = ParallelLayout(1, 1, 0)
layout.init_groups("cpu")
engines = {}
for name in ["ours"] + [f"ours-{s}" for s in extra]:
    stage = StageModel.from_sharded(sharded, range(30), True, True, dtype=torch.float32)
    apply_lora(stage, config.lora, seed=0)
    if name == "ours-torch-dropout":  # peft's nn.Dropout instead of LoraDropout
        for m in stage.modules():
            d = getattr(m, "lora_dropout", None)
            if isinstance(d, nn.ModuleDict):
                for k in list(d.keys()):
                    d[k] = nn.Dropout(d[k].p) if isinstance(d[k], LoraDropout) else d[k]
    engines[name] = TrainEngine(stage, layout, config, device=torch.device("cpu"))

# The peer: HF Trainer on peft's model, its own loop; ours runs inside its step-end callback.
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROP,
                                         target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
rows = [{k: b[k][i] for k in ("input_ids", "labels", "position_ids")}
        for b in batches for i in range(b["input_ids"].shape[0])]
times = {"hf-peft": [], **{name: [] for name in engines}}

def ours_step(i):
    order = list(engines) if i % 2 == 0 else list(reversed(engines))
    for name in order:
        t0 = time.perf_counter()
        engines[name].train_step([batches[i]])
        times[name].append(time.perf_counter() - t0)

# Step i: HF then ours for even i, ours then HF for odd i, so neither side always runs right
# after the other. HF's window is its training step, clipping, optimizer, scheduler and
# zero_grad; its batch is fetched before on_step_begin (ours are prebuilt too).
class Interleave(TrainerCallback):
    def on_step_begin(self, args, state, control, **k):
        if state.global_step % 2 == 1:
            ours_step(state.global_step)
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **k):
        times["hf-peft"].append(time.perf_counter() - self.t0)
        if state.global_step % 2 == 1:  # global_step counts this step already
            ours_step(state.global_step - 1)

with tempfile.TemporaryDirectory() as tmp:
    targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch,
        max_steps=steps, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch", logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    collate = lambda items: {k: torch.stack([x[k] for x in items]) for k in items[0]}
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate,
                      callbacks=[Interleave()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    trainer.train()
print(json.dumps({k: v[2:] for k, v in times.items()}))  # the first 2 steps warm up
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="HF steps per run (2 untimed)")
    p.add_argument("--runs", type=int, default=1, help="fresh processes, one after the other")
    p.add_argument("--loss-on", choices=["all", "bot"], default="all")
    p.add_argument("--also-torch-dropout", action="store_true", help="add ours on peft's own path")
    return p.parse_args(argv)


def one_run(args: argparse.Namespace) -> dict[str, list[float]]:
    cmd = [sys.executable, "-c", CHILD, str(args.seq_length), str(args.batch_size)]
    extra = ["torch-dropout"] * args.also_torch_dropout
    cmd += [str(args.steps), args.loss_on, ",".join(extra)]
    r = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 3:
        sys.exit("--steps must be >= 3 (the first 2 are not timed)")
    tokens = args.seq_length * args.batch_size
    print(
        f"SmolLM2-135M-Instruct fp32 on CPU ({os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}) | {tokens} tokens/step "
        f"| LoRA r=16 on q/k/v/o, dropout 0.05 | loss on {args.loss_on} | step-interleaved"
    )
    pooled: dict[str, list[float]] = {}
    for run in range(args.runs):
        times = one_run(args)
        line = [f"run {run + 1}:"]
        for name, values in times.items():
            line.append(f"{name} {statistics.median(values):.3f} s/step")
        for name in times:
            if name == "hf-peft":
                continue
            ratios = [h / o for h, o in zip(times["hf-peft"], times[name], strict=True)]
            pooled.setdefault(name, []).extend(ratios)
            line.append(
                f"| hf-peft/{name} {statistics.median(ratios):.3f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f})"
            )
        print(" ".join(line), flush=True)
    for name, ratios in pooled.items():
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"{name} vs HF Trainer + peft, {len(ratios)} step pairs: median {q[1]:.3f}x "
            f"(quartiles {q[0]:.3f}-{q[2]:.3f}; goal >= 1.1x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
