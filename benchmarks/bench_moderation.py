"""Benchmark moderation: classifications/s batched vs one at a time vs a naive scorer, and the
share of a bot turn that moderation takes, on the embedded SmolLM2-135M-Instruct (CPU).

- ours, batched: `Moderator.classify_many`, `--batch-size` texts x 5 labels per forward pass,
  the few-shot prefix's KV cache computed once;
- ours, one at a time: `Moderator.classify` per text (5 rows per forward, prefix cached);
- naive peer: the textbook scorer (as lm-evaluation-harness's unbatched loglikelihood): one
  forward pass of the whole prompt + label per (text, label), full logits.
All three give the same labels (checked); the texts are the first `--texts` of the hand-written
check set (data/moderation-sample/check.jsonl). The encoder kind (`make demo-moderation`:
all-MiniLM-L6-v2 + a classification head, `EncoderModerator`) is measured the same way: batched
and one at a time, against its peer, sentence-transformers' own `encode` of the same texts with
the same head applied in numpy (same labels checked). Then a bot turn (`ChatSession.say`, greedy,
`--max-tokens` new tokens) with moderation off, on with the LM moderator and on with the encoder
moderator (user message + answer classified), alternated; each moderator's share of the turn =
(on - off) / on, and its added latency per turn. Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_moderation.py [--repeats 3] [--texts 24] \
        [--encoder-moderation huggingface_models/MiniLM-moderation-demo]
Without --encoder-moderation the encoder kind runs the embedded MiniLM with a random head (the
same work per message as a trained one).
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
    p.add_argument(
        "--encoder-moderation", metavar="DIR", help="an encoder moderation folder (see above)"
    )
    return p.parse_args()


def encoder_moderator(folder: str | None, batch_size: int):
    """The folder's EncoderModerator, else the embedded MiniLM with a random head."""
    import torch

    from openchatkit.inference.encoder_moderator import (
        DEFAULT_ENCODER,
        EncoderModerator,
        encoder_path,
        load_encoder_moderator,
    )

    if folder:
        return load_encoder_moderator(folder, device="cpu", batch_size=batch_size)
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path(DEFAULT_ENCODER, None)
    g = torch.Generator().manual_seed(0)
    return EncoderModerator(
        AutoModel.from_pretrained(path, local_files_only=True).eval(),
        AutoTokenizer.from_pretrained(path, local_files_only=True),
        torch.randn(5, 384, generator=g) * 5,
        torch.zeros(5),
        device="cpu",
        batch_size=batch_size,
        name=f"{DEFAULT_ENCODER} + random head",
    )


def time_runs(runs: dict, texts: list[str], repeats: int) -> tuple[dict, bool]:
    """classifications/s of each run (alternated), and whether all gave the same labels."""
    labels = {name: fn() for name, fn in runs.items()}  # warm-up, and the labels must agree
    agree = len(set(map(tuple, labels.values()))) == 1
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternate so load drift hits all equally
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            rates[name].append(len(texts) / (time.perf_counter() - t))
    return rates, agree


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
    rates, agree = time_runs(runs, texts, args.repeats)
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

    # The encoder kind: ours (batched, one at a time) and sentence-transformers + the same head.
    enc = encoder_moderator(args.encoder_moderation, args.batch_size)
    from sentence_transformers import SentenceTransformer

    from openchatkit.inference.encoder_moderator import encoder_path

    reference = "all-MiniLM-L6-v2"
    if args.encoder_moderation:
        config = Path(args.encoder_moderation) / "moderation_classifier.json"
        reference = json.loads(config.read_text())["encoder"]
    st = SentenceTransformer(encoder_path(reference, Path(enc.name)), device="cpu")
    weight, bias = enc.weight.numpy(), enc.bias.numpy()
    order = [enc.labels.index(label) for label in LABELS]

    def peer() -> list[str]:
        vectors = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
        scores = (vectors @ weight.T + bias)[:, order]
        return [LABELS[i] for i in scores.argmax(1)]

    enc_runs = {
        "encoder, batched": lambda: [r.label for r in enc.classify_many(texts)],
        "encoder, one at a time": lambda: [enc.classify(t)[0] for t in texts],
        "sentence-transformers + head": peer,
    }
    enc_rates, enc_agree = time_runs(enc_runs, texts, args.repeats)
    print(f"\nencoder kind ({enc.name}), median (min-max) of {args.repeats}")
    print(f"{'scorer':<30} {'classifications/s':>22}")
    for name, xs in enc_rates.items():
        print(f"{name:<30} {spread(xs):>22}")
    ours = statistics.median(enc_rates["encoder, batched"])
    theirs = statistics.median(enc_rates["sentence-transformers + head"])
    lm = statistics.median(rates["ours, batched"])
    print(
        f"encoder batched / sentence-transformers: {ours / theirs:.2f}x; same labels: "
        f"{enc_agree}; encoder batched / LM batched: {ours / lm:.1f}x"
    )

    # A bot turn without moderation, with the LM moderator and with the encoder one (same
    # question, greedy, fixed answer length), alternated.
    settings = GenerationSettings(max_tokens=args.max_tokens, sample=False)
    question = "Can you give me some tips for a long train ride?"

    def turn(moderator) -> float:
        session = ChatSession(
            loaded, settings, out=io.StringIO(), err=io.StringIO(), moderator=moderator
        )
        session.moderation_threshold = 1.0  # never refuse: every turn generates its answer
        t = time.perf_counter()
        session.say(question)
        return time.perf_counter() - t

    kinds = {"off": None, "LM moderator": mod, "encoder moderator": enc}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for moderator in kinds.values():
        turn(moderator)  # warm-up
    for _ in range(args.repeats):
        for name, moderator in kinds.items():
            times[name].append(turn(moderator))
    off = times["off"]
    print(f"\nbot turn, {args.max_tokens} new tokens max: without moderation {spread(off)} s")
    for name in ("LM moderator", "encoder moderator"):
        on = times[name]
        share = (statistics.median(on) - statistics.median(off)) / statistics.median(on)
        added = [a - b for a, b in zip(on, off, strict=True)]  # each round ran back to back
        print(
            f"with the {name}: {spread(on)} s; share of the turn {share:.1%} (goal < 25%); "
            f"added latency per turn (user message + answer classified): "
            f"{spread([1000 * a for a in added])} ms"
        )


if __name__ == "__main__":
    main()
