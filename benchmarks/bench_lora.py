"""LoRA on CPU: full fine-tuning against LoRA r=16 in our trainer, and ours against HF Trainer + peft.

Same model (the embedded SmolLM2-135M-Instruct, fp32), same packed batches (data/OIG-sample),
sequence length, batch, AdamW and grad clipping. Each side runs in its own child process (so its
peak RSS is its own), the sides alternating round by round:
- full:    our `TrainEngine`, every weight trained;
- lora:    the same engine with `--lora-r 16 --lora-alpha 32` on q/k/v/o (dropout 0.05);
- hf-peft: `transformers.Trainer` on `peft.get_peft_model` with the same LoraConfig.
Reported per side: median step time (wall and CPU), tokens/s, peak RSS, optimizer-state bytes and
checkpoint bytes (what a resumable checkpoint of that side holds: ours = model or adapter files +
optimizer state; HF = `save_pretrained` of the adapter + optimizer.pt).

    python benchmarks/bench_lora.py                  # ~6 min on 2 cores
    python benchmarks/bench_lora.py --rounds 1 --steps 2
    python benchmarks/bench_lora.py --loss-on bot    # chat SFT: loss on the bot turns only
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
SIDES = ("full", "lora", "hf-peft")

CHILD = r"""
import json, os, resource, statistics, sys, tempfile, time
from pathlib import Path
import torch
side, seq, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
loss_on = sys.argv[5]
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
times = []
def state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))
def dir_bytes(d):
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
with tempfile.TemporaryDirectory() as tmp:
    if side in ("full", "lora"):
        from openchatkit.cli.train import config_with_defaults
        from openchatkit.distributed.layout import ParallelLayout
        from openchatkit.models.lora import apply_lora, save_adapter_stage
        from openchatkit.models.stage import StageModel, save_stage
        from openchatkit.training import checkpoint as ckpt
        from openchatkit.training.config import read_model_shape
        from openchatkit.training.engine import TrainEngine
        flags = dict(lr=2e-4, batch_size=batch, micro_batch_size=batch, total_steps=10_000,
                     loss_on=loss_on)
        if side == "lora":
            flags.update(lora_r=R, lora_alpha=ALPHA, lora_dropout=DROP)
        config = config_with_defaults(read_model_shape(sharded), **flags)
        stage = StageModel.from_sharded(sharded, range(30), True, True, dtype=torch.float32)
        if config.lora is not None:
            apply_lora(stage, config.lora, seed=0)
        engine = TrainEngine(stage, ParallelLayout(1, 1, 0), config, device=torch.device("cpu"))
        for b in batches:
            t0, c0 = time.perf_counter(), time.process_time()
            engine.train_step([b])
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        opt_bytes = state_bytes(engine.optimizer)
        if config.lora is None:
            save_stage(stage, tmp)
        else:
            save_adapter_stage(stage, Path(tmp), 0, "none")
        ckpt.write_stage_state(Path(tmp), 0, *engine.state_dict())
    else:
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
        args = TrainingArguments(output_dir=tmp + "/hf", per_device_train_batch_size=batch,
            max_steps=len(batches), learning_rate=2e-4, lr_scheduler_type="linear",
            warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch",
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)
        collate = lambda items: {k: torch.stack([x[k] for x in items]) for k in items[0]}
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                          callbacks=[Timer()])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
        opt_bytes = state_bytes(trainer.optimizer)
        model.save_pretrained(tmp + "/ckpt")
        torch.save(trainer.optimizer.state_dict(), tmp + "/ckpt/optimizer.pt")
        tmp = tmp + "/ckpt"
    timed = times[2:]  # the first steps fault in memory and warm caches
    print(json.dumps({
        "wall": statistics.median(t for t, _ in timed), "cpu": statistics.median(c for _, c in timed),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "opt_bytes": opt_bytes, "ckpt_bytes": dir_bytes(tmp)}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per round and side (2 untimed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}"
    )
    p.add_argument(
        "--loss-on",
        choices=["all", "bot"],
        default="all",
        help="bot: labels -100 on the human turns (~57%% of tokens here), the same for every side",
    )
    return p.parse_args(argv)


def child(side: str, args: argparse.Namespace) -> dict:
    env = {
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
    if {"lora", "hf-peft"} <= set(sides):
        wall = med("hf-peft", "wall") / med("lora", "wall")
        cpu = med("hf-peft", "cpu") / med("lora", "cpu")
        print(
            f"ours (LoRA) vs HF Trainer + peft: tokens/s {wall:.2f}x wall, {cpu:.2f}x CPU time "
            "(goal >= 1.1x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
