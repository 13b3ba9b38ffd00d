"""Benchmark oneDNN-packed linear layers (openchatkit/models/packed_linear.py) against plain
nn.Linear on the embedded SmolLM2-135M-Instruct in float32, side by side on one model object.

Two loads, alternating packed and plain, median of --repeats:
- server: transformers' continuous batching manager (the server's torch engine,
  `generate_batch`), 8 chat prompts x --new-tokens, greedy;
- chat: one prompt through `model.generate` with its KV cache (a bot turn), greedy.
Prints tokens/s, the ratio packed / plain with its range, and whether the tokens are the same.
Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_packed_linear.py [--repeats 3] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from openchatkit.models.loading import load_chat_model
from openchatkit.models.packed_linear import PackedLinear

TOPICS = "moon volcanoes bread bees chess rivers glass clocks".split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()

    loaded = load_chat_model(None, device="cpu", dtype="float32")  # plain nn.Linear
    model, tok = loaded.model, loaded.tokenizer
    swaps = [
        (parent, name, child, PackedLinear(child))
        for parent in list(model.modules())
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]

    def use(packed: bool) -> None:
        for parent, name, plain, pk in swaps:
            setattr(parent, name, pk if packed else plain)

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

    for name, fn in (("server, 8 prompts", server), ("chat, 1 prompt", chat)):
        use(False)
        fn()  # warm-up: allocator, oneDNN kernels
        use(True)
        fn()
        speeds: dict[bool, list[float]] = {False: [], True: []}
        texts: dict[bool, list] = {}
        for _ in range(args.repeats):
            for packed in (False, True):
                use(packed)
                tps, texts[packed] = fn()
                speeds[packed].append(tps)
        ratios = [a / b for a, b in zip(speeds[True], speeds[False], strict=True)]
        print(
            f"{name}: plain {statistics.median(speeds[False]):.1f} tok/s "
            f"{[round(s, 1) for s in speeds[False]]}, packed {statistics.median(speeds[True]):.1f} "
            f"{[round(s, 1) for s in speeds[True]]}; packed / plain "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f}); "
            f"same tokens: {texts[True] == texts[False]}"
        )


if __name__ == "__main__":
    main()
