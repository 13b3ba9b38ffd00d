"""Training throughput: our trainer (pp=1) against the HF `Trainer`, and pp=2 pipeline efficiency.

Part 1, in this process, same model (the embedded SmolLM2-135M-Instruct), same packed batches
(data/OIG-sample), sequence length, batch, precision (fp32), optimizer (AdamW), LR schedule and
grad clipping: the median step time of our `TrainEngine` against `transformers.Trainer`; the two
are run in alternating rounds so load from other processes hits both alike.

Part 2, `training/dist_clm_train.py` itself: pp=1 in one process with one thread against pp=2
on gloo (two processes, one thread each) with m micro-batches. The ideal speed-up of p stages is
p*m/(m+p-1) (the bubble is (p-1)/(m+p-1)); pipeline efficiency = measured / ideal speed-up.

    python benchmarks/bench_train.py                       # ~10 min on a 2-core CPU
    python benchmarks/bench_train.py --steps 4 --skip-pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--pipeline-steps", type=int, default=5)
    p.add_argument("--microbatches", type=int, default=4, help="m for the pp=2 run")
    p.add_argument("--skip-pipeline", action="store_true")
    return p.parse_args(argv)


def make_batches(tokenizer, seq_length: int, batch_size: int, count: int) -> list[dict]:
    from openchatkit.data import GlobalBatchLoader, PackedSequenceStream

    stream = PackedSequenceStream(
        str(REPO / "data" / "OIG-sample" / "train.jsonl"), tokenizer, seq_length, seed=0
    )
    loader = GlobalBatchLoader(stream, batch_size)
    return [next(loader) for _ in range(count)]


def bench_ours(sharded: Path, batches: list[dict], lr: float):
    """A generator: each next() runs len(batches) steps and yields their step times."""
    import torch

    from openchatkit.cli.train import config_with_defaults
    from openchatkit.distributed.layout import ParallelLayout
    from openchatkit.models.stage import StageModel
    from openchatkit.training.config import read_model_shape
    from openchatkit.training.engine import TrainEngine

    stage = StageModel.from_sharded(sharded, range(30), True, True, dtype=torch.float32)
    rows = batches[0]["input_ids"].shape[0]
    config = config_with_defaults(
        read_model_shape(sharded), lr=lr, batch_size=rows, micro_batch_size=rows, total_steps=10_000
    )
    engine = TrainEngine(stage, ParallelLayout(1, 1, 0), config, device=torch.device("cpu"))
    while True:
        times = []
        for b in batches:
            t0, c0 = time.perf_counter(), time.process_time()
            engine.train_step([b])
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        yield times


def bench_hf(hf_dir: Path, batches: list[dict], lr: float, tmp: Path):
    """The same with `transformers.Trainer` (one `train()` per round, timed per step)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    rows = [
        {k: b[k][i] for k in ("input_ids", "labels", "position_ids")}
        for b in batches
        for i in range(b["input_ids"].shape[0])
    ]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append((time.perf_counter() - self.t0, time.process_time() - self.c0))

    def collate(items):
        return {k: torch.stack([x[k] for x in items]) for k in items[0]}

    while True:
        timer = Timer()
        args = TrainingArguments(
            output_dir=str(tmp / "hf"),
            per_device_train_batch_size=batches[0]["input_ids"].shape[0],
            max_steps=len(batches),
            learning_rate=lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            max_grad_norm=1.0,
            weight_decay=0.0,
            optim="adamw_torch",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=collate,
            callbacks=[timer],
        )
        # Same order as ours: no shuffling.
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
        yield timer.times


def run_cli(args: list[str], nproc: int, env: dict) -> list[float]:
    """Run dist_clm_train.py and return tokens/s of each step from metrics.jsonl."""
    ckpt = Path(args[args.index("--checkpoint-path") + 1])
    train = str(REPO / "training" / "dist_clm_train.py")
    if nproc == 1:
        cmd = [sys.executable, train, *args]
    else:
        launch = str(REPO / "training" / "launch.py")
        cmd = [sys.executable, launch, "--nproc", str(nproc), "--device", "cpu", "--", train, *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"trainer failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [x["tokens_per_s"] for x in recs if x.get("kind") == "train"]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from openchatkit.models.embedded import ensure_embedded_model
    from openchatkit.models.pretrained import prepare_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_dir = ensure_embedded_model()
    sharded = prepare_pretrained("SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    batches = make_batches(tokenizer, args.seq_length, args.batch_size, args.steps + 1)
    tokens_per_step = args.seq_length * args.batch_size
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (x.split(":", 1)[1].strip() for x in cpu.splitlines() if "Model name" in x), "?"
    )
    print(f"machine: {model_name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(
        f"model: SmolLM2-135M-Instruct fp32 | seq {args.seq_length} x batch {args.batch_size} "
        f"= {tokens_per_step} tokens/step | AdamW, clip 1.0"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ours = bench_ours(sharded, batches, 2e-5)
        hf = bench_hf(hf_dir, batches, 2e-5, Path(tmp))
        ours_t, hf_t, ratios = [], [], []
        for r in range(args.rounds):
            # The first step of each round warms caches and is not counted; the sides take
            # turns going first.
            first, second = (ours, hf) if r % 2 == 0 else (hf, ours)
            a, b = next(first)[1:], next(second)[1:]
            ours_r, hf_r = (a, b) if r % 2 == 0 else (b, a)
            ours_t += ours_r
            hf_t += hf_r
            o, h = statistics.median(t for t, _ in ours_r), statistics.median(t for t, _ in hf_r)
            ratios.append(h / o)
            print(
                f"round {r + 1}: ours {o:.3f} s/step "
                f"({statistics.median(c for _, c in ours_r):.3f} CPU s), HF Trainer "
                f"{h:.3f} s/step ({statistics.median(c for _, c in hf_r):.3f} CPU s), "
                f"ratio {h / o:.2f}x",
                flush=True,
            )
        print(f"ratio per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    # Wall time suffers from other jobs on a shared machine; CPU time (all threads of this
    # process) much less, so both are reported.
    for label, idx in (("wall", 0), ("CPU", 1)):
        ours_tps = tokens_per_step / statistics.median(x[idx] for x in ours_t)
        hf_tps = tokens_per_step / statistics.median(x[idx] for x in hf_t)
        print(
            f"[{label} time] ours (pp=1): {ours_tps:8.1f} tokens/s | HF Trainer: "
            f"{hf_tps:8.1f} tokens/s | ratio {ours_tps / hf_tps:.2f}x (goal >= 1.1x) "
            f"| median of {len(ours_t)} steps each"
        )

    if args.skip_pipeline:
        return 0
    m = args.microbatches
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pp in (1, 2):
            flags = [
                "--model-name", str(sharded), "--task-name",
                str(REPO / "data" / "OIG-sample" / "train.jsonl"),
                "--seq-length", str(args.seq_length), "--batch-size", str(m),
                "--micro-batch-size", "1", "--total-steps", str(args.pipeline_steps),
                "--checkpoint-steps", "0", "--checkpoint-path", f"{tmp}/pp{pp}",
                "--pipeline-group-size", str(pp), "--device", "cpu", "--lr", "2e-5",
                "--stop-after-steps", str(args.pipeline_steps - 1),  # no final checkpoint write
            ]  # fmt: skip
            tps = run_cli(flags, pp, env)
            results[pp] = statistics.median(tps[1:])
            print(f"dist_clm_train.py pp={pp}: {results[pp]:.1f} tokens/s (1 thread per stage)")
    p = 2
    speedup = results[2] / results[1]
    ideal = p * m / (m + p - 1)
    print(
        f"pp=2, m={m}: speed-up {speedup:.2f}x vs ideal {ideal:.2f}x "
        f"(ideal bubble (p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.3f}, measured bubble "
        f"{1 - speedup / p:.3f}); pipeline efficiency {speedup / ideal:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
