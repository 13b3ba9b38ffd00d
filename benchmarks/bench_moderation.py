"""Benchmark moderation: classifications/s batched vs one at a time vs a naive scorer, and the
share of a bot turn that moderation takes, on the embedded SmolLM2-135M-Instruct (CPU).

- ours, batched: `Moderator.classify_many`, `--batch-size` texts x 5 labels per forward pass,
  the few-shot prefix's KV cache computed once;
- ours, one at a time: `Moderator.classify` per text (5 rows per forward, prefix cached);
- naive peer: the textbook scorer (as lm-evaluation-harness's unbatched loglikelihood): one
  forward pass of the whole prompt + label per (text, label), full logits.
All three give the same labels (checked); the texts are the first `--texts` of the hand-written
check set (data/moderation-sample/check.jsonl). Then a bot turn (`ChatSession.say`, greedy,
`--max-tokens` new tokens) with moderation on (user message + answer classified) and off,
alternated; moderation's share = (on - off) / on, and the added latency per turn. Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_moderation.py [--repeats 3] [--texts 24]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--texts", type=int, default=24, help="texts from the check set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per bot answer")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    return p.parse_args()


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    args = parse_args()
    import torch

    from openchatkit.inference.generation import GenerationSettings
    from openchatkit.inference.moderator import Moderator
    from openchatkit.inference.session import ChatSession
    from openchatkit.models.loading import load_chat_model
    from openchatkit.moderation import LABELS, build_prompt

    lines = (ROOT / "data/moderation-sample/check.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines[: args.texts]]
    loaded = load_chat_model(None, device="cpu", dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {loaded.dtype}")
    mod = Moderator(model, tok, batch_size=args.batch_size, context_window=loaded.context_window)

    @torch.inference_mode()
    def naive(text: str) -> str:
        prompt = tok(build_prompt(text))["input_ids"]
        scores = []
        for label in LABELS:
            cont = tok(" " + label, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([prompt + cont])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            scores.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont)))
        return LABELS[max(range(len(LABELS)), key=scores.__getitem__)]

    runs = {
        "ours, batched": lambda: [r.label for r in mod.classify_many(texts)],
        "ours, one at a time": lambda: [mod.classify(t)[0] for t in texts],
        "naive, one forward per label": lambda: [naive(t) for t in texts],
    }
    labels = {name: fn() for name, fn in runs.items()}  # warm-up, and the labels must agree
    agree = len(set(map(tuple, labels.values()))) == 1
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternate so load drift hits all equally
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            rates[name].append(len(texts) / (time.perf_counter() - t))
    print(
        f"\n{len(texts)} texts, prompt with 5 few-shot examples, median (min-max) of {args.repeats}"
    )
    print(f"{'scorer':<30} {'classifications/s':>22}")
    for name, xs in rates.items():
        print(f"{name:<30} {spread(xs):>22}")
    base = statistics.median(rates["ours, one at a time"])
    print(f"batched / one at a time: {statistics.median(rates['ours, batched']) / base:.2f}x")
    naive_rate = statistics.median(rates["naive, one forward per label"])
    print(f"one at a time / naive: {base / naive_rate:.2f}x; same labels: {agree}")

    # A bot turn with and without moderation (same question, greedy, fixed answer length).
    settings = GenerationSettings(max_tokens=args.max_tokens, sample=False)
    question = "Can you give me some tips for a long train ride?"

    def turn(moderated: bool) -> float:
        session = ChatSession(loaded, settings, out=io.StringIO(), err=io.StringIO(), moderator=mod)
        session.moderation_on = moderated
        t = time.perf_counter()
        session.say(question)
        return time.perf_counter() - t

    turn(True), turn(False)
    on, off = [], []
    for _ in range(args.repeats):
        on.append(turn(True))
        off.append(turn(False))
    share = (statistics.median(on) - statistics.median(off)) / statistics.median(on)
    added = [a - b for a, b in zip(on, off, strict=True)]  # each pair ran back to back
    print(
        f"\nbot turn, {args.max_tokens} new tokens max: with moderation {spread(on)} s, "
        f"without {spread(off)} s; moderation's share of the turn {share:.1%} (goal < 25%)"
    )
    print(
        f"added latency per turn with moderation on (user message + answer classified): "
        f"{spread([1000 * a for a in added])} ms"
    )


if __name__ == "__main__":
    main()
