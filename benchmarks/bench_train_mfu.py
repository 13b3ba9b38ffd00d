"""GPU training MFU: our engine (pp=1) against a plain HF training loop, same model, one process.

The model is a random-init GPT-NeoX built from Pythia-1.4B's config (24 layers, hidden 2048,
16 heads, vocab 50304; 1.41B parameters), so nothing is downloaded. Both sides train it in bf16
on random tokens of `--seq-length`, `--num-microbatches` micro-batches of `--micro-batch-size`
per step, AdamW and grad clipping at 1.0, SDPA attention:
- ours: `StageModel` + `TrainEngine` (bf16 weights, fp32 master weights, token-mean loss);
- peer: `GPTNeoXForCausalLM` in fp32 under `torch.autocast(bfloat16)` — what HF `Trainer(bf16=True)`
  runs — with the loss of each micro-batch divided by their number.
MFU = tokens/s x (6N + 12·L·H·S) / peak bf16 FLOP/s of the device (the trainer's formula).
The sides alternate rounds; the median step time of each is reported.

    python benchmarks/bench_train_mfu.py                   # one GPU, ~3 min on an H100/H200
    python benchmarks/bench_train_mfu.py --config tiny --device cpu --steps 2   # smoke run

Needs torch, transformers, safetensors and loguru (the package's imports). On a GPU machine
without a registry, `make gpu-wheels` here first and carry `.whl/`; `benchmarks/gpu_check.sh`
installs them (`--no-index --no-deps`) and runs this as its part 3.
"""

from __future__ import annotations

import argparse
import statistics
import time

from openchatkit.models.published import published_config

REDPAJAMA_3B = "togethercomputer_RedPajama-INCITE-Base-3B-v1"

CONFIGS = {
    "pythia-1.4b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=8192,
        vocab_size=50304,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
    # RedPajama-INCITE-3B, the LoRA recipe's base: the planner's published shape plus the two
    # fields it does not need.
    "redpajama-3b": dict(
        {k: v for k, v in published_config(REDPAJAMA_3B).items() if k != "model_type"},
        max_position_embeddings=2048,
        use_parallel_residual=False,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=512,
        rotary_pct=0.25,
        max_position_embeddings=256,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="pythia-1.4b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args(argv)


def make_batches(vocab: int, args, device) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_length)
    out = []
    for _ in range(args.num_microbatches):
        ids = torch.randint(0, vocab, shape, generator=g)
        pos = torch.arange(args.seq_length).expand(shape)
        out.append(
            {"input_ids": ids.to(device), "labels": ids.to(device), "position_ids": pos.to(device)}
        )
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ours(config, batches, device):
    import torch

    from openchatkit.cli.train import config_with_defaults
    from openchatkit.distributed.layout import ParallelLayout
    from openchatkit.models.stage import StageModel
    from openchatkit.training.config import ModelShape
    from openchatkit.training.engine import TrainEngine

    torch.manual_seed(0)
    layers = range(config.num_hidden_layers)
    stage = StageModel(config, layers, True, True, dtype=torch.bfloat16, device=device)
    rows = batches[0]["input_ids"].shape[0]
    train_config = config_with_defaults(
        ModelShape.from_dict(config.to_dict()),
        bf16=True,
        batch_size=rows,
        micro_batch_size=rows,
        total_steps=10_000,
    )
    engine = TrainEngine(stage, ParallelLayout(1, 1, 0), train_config, device=device)
    # One pass per micro-batch through the engine's accumulation path: the same work as the peer.
    return (lambda: engine.train_step(batches)), (lambda: engine.module)


def bench_hf(config, batches, device):
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    n = len(batches)

    def step():
        for b in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(input_ids=b["input_ids"], labels=b["labels"])
            (out.loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda: model


def time_steps(step, steps: int, device) -> list[float]:
    out = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import GPTNeoXConfig

    from openchatkit.training.metrics import matmul_params, model_flops_per_token, peak_flops

    device = torch.device(args.device)
    config = GPTNeoXConfig(**CONFIGS[args.config])
    config._attn_implementation = "sdpa"
    batches = make_batches(config.vocab_size, args, device)
    tokens = args.seq_length * args.micro_batch_size * args.num_microbatches
    sides = {}
    for name, build in (("ours", bench_ours), ("hf", bench_hf)):
        step, model = build(config, batches, device)
        step()  # warm-up: allocator, kernels, optimizer state
        sides[name] = [step, model, []]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    num_params = sum(p.numel() for p in sides["hf"][1]().parameters())
    for _ in range(args.rounds):
        for name in sides:
            sides[name][2] += time_steps(sides[name][0], args.steps, device)
    peak = peak_flops(device.type, "bf16")
    matmul = matmul_params(num_params, config.vocab_size, config.hidden_size, False)
    flops_tok = model_flops_per_token(
        matmul, config.num_hidden_layers, config.hidden_size, args.seq_length
    )
    name_dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{args.config} ({num_params / 1e9:.2f}B params) bf16 on {name_dev} | seq "
        f"{args.seq_length} x micro-batch {args.micro_batch_size} x {args.num_microbatches} "
        f"= {tokens} tokens/step | {args.rounds} rounds x {args.steps} steps"
    )
    rates = {}
    for name, (_, _, times) in sides.items():
        med = statistics.median(times)
        rates[name] = tokens / med
        mfu = f"{100 * rates[name] * flops_tok / peak:.1f}%" if peak else "n/a (unknown peak)"
        print(f"  {name:5s} step {med * 1000:8.1f} ms  {rates[name]:10.0f} tokens/s  MFU {mfu}")
    print(f"ours / hf tokens/s: {rates['ours'] / rates['hf']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
