"""Activation checkpointing on CPU: time and kept activation bytes of one training step of a
small GPT-NeoX stage, layers plain vs recomputed (`StageModel.set_activation_checkpointing`).

Alternating repetitions of both sides in one run; prints the median and spread of the step time,
the ratio, and the bytes the forward keeps for the backward (an allocator count, `LiveBytes`)
against the memory planner's prediction.

    python benchmarks/bench_checkpointing.py
    python benchmarks/bench_checkpointing.py --hidden 512 --seq-length 512 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating repetitions per side")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import GPTNeoXConfig

    from openchatkit.models.shape import ModelShape
    from openchatkit.models.stage import StageModel
    from openchatkit.training.memory import TrainSetup, plan_memory
    from openchatkit.training.memory_probe import LiveBytes

    h, n = args.hidden, args.layers
    config = GPTNeoXConfig(
        hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n, num_attention_heads=h // 64,
        vocab_size=1024, max_position_embeddings=args.seq_length, rotary_pct=0.25,
    )  # fmt: skip
    torch.manual_seed(0)
    stage = StageModel(config, range(n), False, False)  # a middle stage: layers only
    x = torch.randn(args.micro_batch_size, args.seq_length, h, requires_grad=True)
    grad = torch.randn_like(x)
    dims = ModelShape.from_dict(config.to_dict())

    def step() -> None:
        stage(x).backward(grad)

    kept, times = {}, {"none": [], "layers": []}
    for mode in times:
        stage.set_activation_checkpointing(mode)
        with LiveBytes(exclude=[x, *stage.parameters(), *stage.buffers()]) as probe:
            out = stage(x)
            kept[mode] = probe.live
        del out
        step()  # warm-up
    for _ in range(args.rounds):
        for mode in times:
            stage.set_activation_checkpointing(mode)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[mode].append((time.perf_counter() - t0) / args.steps)
    tokens = args.micro_batch_size * args.seq_length
    print(
        f"GPT-NeoX stage: {n} layers, hidden {h}, {tokens} tokens per step, fp32, CPU "
        f"({torch.get_num_threads()} threads), {args.rounds} alternating rounds x {args.steps} steps"
    )
    for mode, values in times.items():
        # A middle stage of three (its input is a receive buffer, not counted here either).
        ranges = (range(0, 1), range(1, n + 1), range(n + 1, n + 2))
        setup = TrainSetup(
            ranges, args.micro_batch_size, args.seq_length, 1, activation_checkpointing=mode
        )
        predicted = plan_memory(dims, setup)[1].act_per_microbatch
        spread = max(values) - min(values)
        print(
            f"  {mode:<6} step {1000 * statistics.median(values):7.1f} ms (spread "
            f"{1000 * spread:5.1f}) | kept {kept[mode] / 2**20:6.2f} MiB, planner "
            f"{predicted / 2**20:6.2f} MiB"
        )
    ratio = statistics.median(times["layers"]) / statistics.median(times["none"])
    print(
        f"  recompute costs x{ratio:.2f} step time for x{kept['none'] / kept['layers']:.1f} less kept memory"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
