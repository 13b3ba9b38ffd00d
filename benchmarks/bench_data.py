"""Data loader throughput: our streaming tokenize+pack vs `datasets.map(batched=True)`.

    python benchmarks/bench_data.py              # 50 MB of generated OIG-style jsonl
    python benchmarks/bench_data.py --mb 200     # bigger
    python benchmarks/bench_data.py --data path/to/file.jsonl

Both sides use the same fast tokenizer (the embedded SmolLM2 one unless --tokenizer), the same
file and the same TOKENIZERS_PARALLELISM, and each runs in its own fresh subprocess; the sides
alternate for --repeats rounds and each side's fastest run is kept. Reported per side: wall time from the jsonl file to token ids, tokens/s, and memory as
the subprocess's peak RSS (`ru_maxrss`) and its growth over the RSS measured after imports.

- ours: `PackedSequenceStream(..., cycle=False)` over the file, every packed window of
  --seq-length tokens consumed (reading, JSON parsing, batched tokenization, EOS joining, packing,
  labels and position ids included).
- baseline: `datasets.load_dataset("json")` (jsonl -> Arrow cache) then
  `.map(tokenizer(batch["text"]), batched=True)` writing the ids to the Arrow cache (no packing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water been "
    "call who oil its now find long down day did get come made may part capital river mountain "
    "photosynthesis electricity government temperature conversation assistant question answer"
).split()


def generate(path: Path, megabytes: float, seed: int = 0) -> None:
    """OIG-style multi-turn records totalling `megabytes` MB."""
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    written = 0
    with open(path, "w") as f:
        while written < target:
            turns = []
            for _ in range(rng.randint(1, 4)):
                q = " ".join(rng.choices(WORDS, k=rng.randint(5, 25))).capitalize() + "?"
                a = " ".join(rng.choices(WORDS, k=rng.randint(10, 120))).capitalize() + "."
                if rng.random() < 0.3:
                    a += f" The answer is {rng.randint(0, 10**6)}."
                turns.append(f"<human>: {q}\n<bot>: {a}")
            line = json.dumps({"text": "\n".join(turns), "metadata": {"source": "bench"}}) + "\n"
            f.write(line)
            written += len(line)


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB on Linux


def worker_ours(data: Path, tokenizer_dir: str, seq_length: int) -> dict:
    from transformers import AutoTokenizer

    from openchatkit.data import PackedSequenceStream

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = rss_mb()
    start = time.perf_counter()
    stream = PackedSequenceStream(str(data), tok, seq_length=seq_length, cycle=False)
    num_tokens = 0
    for item in stream:
        num_tokens += int((item["labels"] != -100).sum())  # real tokens (the last window is padded)
    seconds = time.perf_counter() - start
    return {"tokens": num_tokens, "seconds": seconds, "rss_after_imports_mb": base}


def worker_datasets(data: Path, tokenizer_dir: str, cache_dir: str) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = rss_mb()
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=cache_dir)
    loaded = time.perf_counter()
    ds = ds.map(
        lambda batch: tok(batch["text"], add_special_tokens=False),
        batched=True,
        remove_columns=ds.column_names,
    )
    # One EOS per document, as our loader adds, so the token counts are comparable.
    num_tokens = sum(len(ids) + 1 for ids in ds["input_ids"])
    seconds = time.perf_counter() - start
    return {
        "tokens": num_tokens,
        "seconds": seconds,
        "load_seconds": loaded - start,
        "rss_after_imports_mb": base,
    }


def run_worker(kind: str, args: argparse.Namespace, data: Path, cache: str) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", kind, "--data", str(data),
        "--tokenizer", args.tokenizer, "--seq-length", str(args.seq_length), "--cache", cache,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="size of generated jsonl (MB)")
    parser.add_argument("--data", type=Path, default=None, help="use this jsonl instead")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: embedded)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, best kept")
    parser.add_argument("--worker", choices=["ours", "datasets"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "ours":
            result = worker_ours(args.data, args.tokenizer, args.seq_length)
        else:
            result = worker_datasets(args.data, args.tokenizer, args.cache)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return 0
    if args.tokenizer is None:
        from openchatkit.models.embedded import ensure_embedded_model

        args.tokenizer = str(ensure_embedded_model())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "bench.jsonl"
            generate(data, args.mb)
        size_mb = data.stat().st_size / 1e6
        print(f"data: {data} ({size_mb:.1f} MB); tokenizer: {args.tokenizer}")
        print(
            f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}, seq_length={args.seq_length}"
        )
        # The machine is shared: alternate the two sides and keep each side's fastest run.
        runs: dict[str, list[dict]] = {"ours": [], "datasets": []}
        for i in range(args.repeats):
            runs["ours"].append(run_worker("ours", args, data, tmp))
            cache = str(Path(tmp) / f"hf_cache_{i}")  # a fresh cache: no reuse between runs
            runs["datasets"].append(run_worker("datasets", args, data, cache))
        for kind, rs in runs.items():
            print(f"{kind:9s} seconds per run: " + ", ".join(f"{r['seconds']:.1f}" for r in rs))
        ours = min(runs["ours"], key=lambda r: r["seconds"])
        base = min(runs["datasets"], key=lambda r: r["seconds"])
    rows = [("ours (stream tokenize+pack)", ours), ("datasets.map(batched=True)", base)]
    print(
        f"{'':32s} {'tokens':>12s} {'seconds':>8s} {'tokens/s':>10s} {'peak RSS MB':>12s} {'RSS growth MB':>14s}"
    )
    for name, r in rows:
        growth = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        print(
            f"{name:32s} {r['tokens']:12d} {r['seconds']:8.1f} {r['tokens'] / r['seconds']:10.0f} "
            f"{r['peak_rss_mb']:12.0f} {growth:14.0f}"
        )
    print(f"(baseline: {base['load_seconds']:.1f} s of its time is load_dataset's jsonl -> Arrow)")
    if ours["tokens"] != base["tokens"]:
        print(f"note: token counts differ by {ours['tokens'] - base['tokens']}")
    ratio = (ours["tokens"] / ours["seconds"]) / (base["tokens"] / base["seconds"])
    print(f"speed ratio ours/baseline: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
