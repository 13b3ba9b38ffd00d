"""Benchmark the torch backend's two CPU levers against plain transformers on the embedded
SmolLM2-135M-Instruct in float32 (or --dtype bfloat16), side by side on one model object:
oneDNN-packed linear layers (openchatkit/models/packed_linear.py, the bot and the server) and grouped-query attention inside
SDPA (the server's TorchBackend sets transformers' TRANSFORMERS_SDPA_FORCE_GQA on a CPU).

Two loads, the variants alternating, median of --repeats:
- server: transformers' continuous batching manager (the server's torch engine,
  `generate_batch`), 8 chat prompts x --new-tokens, greedy: plain, packed, packed + GQA;
- chat: one prompt through `model.generate` with its KV cache (a bot turn), greedy: plain,
  packed (a single unpadded sequence has no mask, so transformers already runs GQA in SDPA).
Prints tokens/s, each variant's ratio to plain (median and range of the per-repeat ratios) and
whether its tokens equal plain's.
Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_engine.py [--repeats 3] [--new-tokens 48]
    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_engine.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from openchatkit.inference.server_engine import GQA_ENV
from openchatkit.models.loading import load_chat_model
from openchatkit.models.packed_linear import PackedLinear, can_pack

TOPICS = "moon volcanoes bread bees chess rivers glass clocks".split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()

    loaded = load_chat_model(None, device="cpu", dtype=args.dtype)  # plain nn.Linear
    model, tok = loaded.model, loaded.tokenizer
    if not can_pack(model):
        raise SystemExit(f"bench_cpu_engine.py: this CPU or torch cannot pack {args.dtype} layers")
    swaps = [
        (parent, name, child, PackedLinear(child))
        for parent in list(model.modules())
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]

    def use(variant: str) -> None:
        for parent, name, plain, pk in swaps:
            setattr(parent, name, plain if variant == "plain" else pk)
        if variant == "packed + GQA":
            os.environ[GQA_ENV] = "1"
        else:
            os.environ.pop(GQA_ENV, None)

    prompts = []
    for i, topic in enumerate(TOPICS):
        msgs = [{"role": "user", "content": f"Client {i}: tell me about {topic}."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    def server() -> tuple[float, list]:
        gen = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=-1)
        cb = ContinuousBatchingConfig(
            page_size=32, num_blocks=257, max_batch_tokens=256, max_requests_per_batch=8
        )
        start = time.perf_counter()
        out = model.generate_batch(
            prompts, generation_config=gen, continuous_batching_config=cb, progress_bar=False
        )
        seconds = time.perf_counter() - start
        tokens = [list(out[k].generated_tokens) for k in sorted(out)]
        return sum(map(len, tokens)) / seconds, tokens

    def chat() -> tuple[float, list]:
        ids = torch.tensor([prompts[0]])
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        seconds = time.perf_counter() - start
        return args.new_tokens / seconds, out[0, ids.shape[1] :].tolist()

    sections = (
        ("server, 8 prompts", server, ("plain", "packed", "packed + GQA")),
        ("chat, 1 prompt", chat, ("plain", "packed")),
    )
    for title, fn, variants in sections:
        for variant in variants:  # warm-up: allocator, oneDNN kernels
            use(variant)
            fn()
        speeds: dict[str, list[float]] = {v: [] for v in variants}
        tokens: dict[str, list] = {v: [] for v in variants}  # every run's
        for _ in range(args.repeats):
            for variant in variants:
                use(variant)
                tps, out = fn()
                tokens[variant].append(out)
                speeds[variant].append(tps)
        print(f"{title}: tokens/s, median [each run]")
        for i, variant in enumerate(variants):
            line = f"  {variant}: {statistics.median(speeds[variant]):.1f} "
            line += str([round(s, 1) for s in speeds[variant]])
            # Against plain, and against the variant before it (what this lever adds).
            for base in sorted({"plain", variants[max(i - 1, 0)]} - {variant}):
                ratios = [a / b for a, b in zip(speeds[variant], speeds[base], strict=True)]
                line += f"; / {base} {statistics.median(ratios):.2f}x "
                line += f"({min(ratios):.2f}..{max(ratios):.2f})"
            if i:
                same = all(t == tokens["plain"][0] for t in tokens["plain"] + tokens[variant])
                line += f"; same tokens as plain, every run: {same}"
            print(line)


if __name__ == "__main__":
    main()
