"""Benchmark the bot's generation path against plain `model.generate`, side by side.

Same model (the embedded SmolLM2-135M-Instruct), same chat prompt, greedy, 128 new tokens (EOS
ignored on both sides so both produce exactly 128), in float32 and bfloat16. Prints tokens/s of
each, the ratio ours/generate, time to first token, and the cold (GGUF → HF folder) and cached
load times. Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_bot.py [--repeats 3] [--skip-cold]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--skip-cold", action="store_true", help="skip the ~20 s GGUF conversion")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    from transformers.generation.streamers import BaseStreamer

    from openchatkit.conversation import PromptFormat
    from openchatkit.inference.generation import GenerationSettings, GenerationStats, stream_text
    from openchatkit.models.embedded import embedded_gguf_path, ensure_embedded_model
    from openchatkit.models.loading import load_chat_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            ensure_embedded_model(dest=__import__("pathlib").Path(tmp) / "m")
            print(
                f"cold load (dequantize {embedded_gguf_path().name} → HF folder): "
                f"{time.perf_counter() - t:.1f} s"
            )
    ensure_embedded_model()
    t = time.perf_counter()
    loaded = load_chat_model(None, device="cpu", dtype="float32")
    print(f"cached load (HF folder, fp32): {time.perf_counter() - t:.2f} s")

    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    prompt = PromptFormat.for_tokenizer(loaded.tokenizer).render(messages)
    ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = args.new_tokens
    settings = GenerationSettings(max_tokens=n, sample=False)

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.start, self.first, self.calls = time.perf_counter(), None, 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter() - self.start

        def end(self):
            pass

    rows = []
    for dtype in args.dtypes:
        model = loaded.model.to(getattr(torch, dtype))

        def ours(model=model):  # bound now: the closure is used in this iteration only
            stats = GenerationStats()
            text = "".join(stream_text(model, loaded.tokenizer, ids, settings, [], [], stats))
            assert stats.generated_tokens == n
            return stats.total_s, stats.first_token_s, text

        def plain(model=model):
            streamer = FirstToken()
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                streamer=streamer,
            )
            total = time.perf_counter() - t0
            assert out.shape[1] - ids.shape[1] == n
            return total, streamer.first, loaded.tokenizer.decode(out[0, ids.shape[1] :])

        ours(), plain()  # warm-up
        o, p = [], []
        for _ in range(args.repeats):  # alternate so drift hits both equally
            o.append(ours())
            p.append(plain())
        same = o[0][2].strip() == p[0][2].replace("<|im_end|>", "").strip()
        o_s, p_s = statistics.median(x[0] for x in o), statistics.median(x[0] for x in p)
        rows.append(
            (
                dtype,
                n / o_s,
                n / p_s,
                (n / o_s) / (n / p_s),
                statistics.median(x[1] for x in o),
                statistics.median(x[1] for x in p),
                same,
            )
        )
        print(f"  sample ({dtype}): {o[0][2][:70]!r}...")
    print(f"\nprompt {ids.shape[1]} tokens, {n} new tokens, greedy, median of {args.repeats}")
    print(
        f"{'dtype':<9} {'ours tok/s':>10} {'generate tok/s':>15} {'ratio':>6} "
        f"{'ours TTFT':>10} {'gen TTFT':>9} {'same text':>9}"
    )
    for d, a, b, r, fa, fb, same in rows:
        print(
            f"{d:<9} {a:>10.1f} {b:>15.1f} {r:>6.2f} {fa * 1000:>8.0f}ms {fb * 1000:>7.0f}ms "
            f"{str(same):>9}"
        )


if __name__ == "__main__":
    main()
