"""The bot's decode loop now against the same loop at an earlier commit, interleaved: was merging
the two decode loops into one `decode` (commit be2a1d4) free?

Both sides are `openchatkit/inference/generation.py`: this checkout's, and the file as it was at
`--rev` (default be2a1d4^, before the merge) loaded as a second module. Same model (the embedded
SmolLM2-135M-Instruct on CPU), same chat prompt, greedy, `--new-tokens` tokens with EOS ignored
on both sides, through both paths the bot uses: `generate_token_ids` on the plain model and on
`TorchChatModel` (the KV cache kept across turns; reset before each run, so each run evaluates
the whole prompt). Runs alternate old/new so drift hits both; the table gives the median and the
spread (min-max) in tokens/s, and whether both sides produced the same tokens.

Run (a quiet machine; the figures go in benchmarks/RESULTS.md):
    OMP_NUM_THREADS=2 python benchmarks/bench_decode_loop.py --repeats 5
    python benchmarks/bench_decode_loop.py --rev be2a1d4^ --new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATION = "openchatkit/inference/generation.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="be2a1d4^", help="the commit to compare with (git rev)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be >= 3 (median and spread)")
    if args.new_tokens < 1:
        p.error("--new-tokens must be >= 1")
    return args


def module_at(rev: str, tmp: Path):
    """generation.py as it was at `rev`, imported as its own module."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{GENERATION}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except subprocess.CalledProcessError as err:
        sys.exit(f"bench_decode_loop.py: error: --rev {rev}: {err.stderr.strip()}")
    path = tmp / "generation_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("generation_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from openchatkit.conversation import PromptFormat
    from openchatkit.inference import generation as new
    from openchatkit.models.loading import load_chat_model

    with tempfile.TemporaryDirectory() as tmp:
        old = module_at(args.rev, Path(tmp))
    loaded = load_chat_model(None, device="cpu", dtype=args.dtype)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    prompt = PromptFormat.for_tokenizer(loaded.tokenizer).render(messages)
    ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = args.new_tokens

    def run(module, path: str) -> tuple[float, list[int]]:
        settings = module.GenerationSettings(max_tokens=n, sample=False)
        model = module.TorchChatModel(loaded.model) if path == "chat model" else loaded.model
        with torch.inference_mode():
            t0 = time.perf_counter()
            tokens = list(module.generate_token_ids(model, ids, settings, []))
            seconds = time.perf_counter() - t0
        assert len(tokens) == n, len(tokens)
        return n / seconds, tokens

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"prompt {ids.shape[1]} tokens, {n} new tokens, greedy, {args.repeats} runs each")  # fmt: skip
    print(f"{'path':<12} {'side':<18} {'tok/s median':>12} {'spread':>15} {'same tokens':>11}")
    for path in ("plain model", "chat model"):
        run(old, path), run(new, path)  # warm-up
        rates: dict[str, list[float]] = {"old": [], "new": []}
        outputs = {}
        for _ in range(args.repeats):
            for side, module in (("old", old), ("new", new)):
                rate, outputs[side] = run(module, path)
                rates[side].append(rate)
        same = outputs["old"] == outputs["new"]
        for side, label in (("old", f"at {args.rev}"), ("new", "this checkout")):
            r = rates[side]
            spread = f"{min(r):.1f}-{max(r):.1f}"
            print(f"{path:<12} {label:<18} {statistics.median(r):>12.1f} {spread:>15} "
                  f"{str(same):>11}")  # fmt: skip
        ratio = statistics.median(rates["new"]) / statistics.median(rates["old"])
        print(f"{path:<12} new / old median: {ratio:.3f}")


if __name__ == "__main__":
    main()
