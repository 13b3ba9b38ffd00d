"""One GPU, pp=1: our engine's step loop with activation checkpointing, its MFU and tokens/s,
and its measured peak memory against the memory planner's prediction. By default a bf16 full
fine-tune of a 1.4B GPT-NeoX; with `--lora-r` the LoRA (and with `--load-in-4bit` the QLoRA)
path, e.g. the 3B LoRA recipe's settings, whose peak the original put at ~14 GB.

The model is random-init from a published config (nothing downloaded). The prediction comes
from `openchatkit.training.memory` for the same TrainConfig; the measurements over the timed
steps are `torch.cuda.max_memory_allocated` (what the planner predicts, less its runtime
allowance), `max_memory_reserved` (the caching allocator's segments) and the card's used memory
at its highest (`torch.cuda.mem_get_info` sampled every 10 ms from a thread: context, cuBLAS
workspaces and cached blocks included), plus the allocator's retries and the library versions.
Part of `benchmarks/gpu_check.sh`.

    python benchmarks/gpu_step_check.py                         # ~2 min on an H100/H200
    python benchmarks/gpu_step_check.py --config redpajama-3b --precision fp16 --lora-r 16 \
        --micro-batch-size 1 --num-microbatches 4               # the 3B LoRA recipe's step
    python benchmarks/gpu_step_check.py --device cpu --config tiny --steps 2 --seq-length 128
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import statistics
import sys
import threading
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # bench_train_mfu beside this file

from bench_train_mfu import CONFIGS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="pythia-1.4b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--activation-checkpointing", choices=["none", "layers"], default="layers")
    p.add_argument("--precision", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA on query_key_value, alpha 2r")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base (with --lora-r)")
    p.add_argument("--optimizer", default="adam", help="adam | 8bit-adam | paged-8bit-adam")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


class CardUsedPeak:
    """The card's used bytes (total - free, every process and the CUDA context included) at
    their highest while running, sampled from a thread."""

    def __init__(self, period_s: float = 0.01):
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.period_s)

    def __enter__(self) -> CardUsedPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import GPTNeoXConfig

    from openchatkit.cli.train import config_with_defaults
    from openchatkit.distributed.layout import ParallelLayout
    from openchatkit.models.stage import StageModel
    from openchatkit.training.config import ModelShape
    from openchatkit.training.engine import TrainEngine
    from openchatkit.training.memory import RUNTIME_BYTES, TrainSetup, plan_memory
    from openchatkit.training.metrics import matmul_params, model_flops_per_token, peak_flops

    device = torch.device(args.device)
    hf_config = GPTNeoXConfig(**CONFIGS[args.config])
    hf_config._attn_implementation = "sdpa"
    rows = args.micro_batch_size * args.num_microbatches
    lora = {}
    if args.lora_r:
        lora = dict(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05)
        lora.update(lora_target_modules="query_key_value", load_in_4bit=args.load_in_4bit)
    config = config_with_defaults(
        ModelShape.from_dict(hf_config.to_dict()),
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        optimizer=args.optimizer,
        batch_size=rows,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        total_steps=10_000,
        activation_checkpointing=args.activation_checkpointing,
        **lora,
    )
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    torch.manual_seed(0)
    stage = StageModel(
        hf_config, range(hf_config.num_hidden_layers), True, True, dtype=dtype, device=device
    )
    if config.lora is not None:  # as the trainer does (openchatkit/training/trainer.py)
        from openchatkit.models.lora import apply_lora

        if config.load_in_4bit:
            from openchatkit.models.quantize import quantize_linear_4bit

            quantize_linear_4bit(stage, compute_dtype=dtype, keep=config.lora.target_modules)
        apply_lora(stage, config.lora, seed=0)
    stage.set_activation_checkpointing(args.activation_checkpointing)
    engine = TrainEngine(stage, ParallelLayout(1, 1, 0), config, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_config.vocab_size, (rows, args.seq_length), generator=g)
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(args.seq_length).expand(rows, -1).clone(),
    }

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    engine.train_step([batch])  # warm-up: allocator, kernels, optimizer state
    sync()
    card = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        card = CardUsedPeak()
        card.__enter__()
    times = []
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.train_step([batch])
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        if card is not None:
            card.__exit__(None, None, None)
    measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
    retries = torch.cuda.memory_stats().get("num_alloc_retries") if device.type == "cuda" else None
    plan = plan_memory(ModelShape.from_dict(hf_config.to_dict()), TrainSetup.from_config(config))[0]
    # Logical parameters (a 4-bit weight counts its elements, not its packed bytes).
    num_params = sum(
        math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
        for p in stage.parameters()
    )
    trainable = sum(p.numel() for p in stage.parameters() if p.requires_grad)
    flops_tok = model_flops_per_token(
        matmul_params(num_params, hf_config.vocab_size, hf_config.hidden_size, False),
        hf_config.num_hidden_layers,
        hf_config.hidden_size,
        args.seq_length,
        # LoRA/QLoRA: 4 FLOPs per frozen weight, 6 per trained one (metrics.py).
        trainable_params=trainable if args.lora_r else None,
    )
    step = statistics.median(times)
    tokens_s = rows * args.seq_length / step
    peak = peak_flops(device.type, args.precision)
    result = {
        "config": args.config,
        "precision": args.precision,
        "lora_r": args.lora_r,
        "load_in_4bit": args.load_in_4bit,
        "optimizer": args.optimizer,
        "trainable_params": trainable,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions(),
        "activation_checkpointing": args.activation_checkpointing,
        "tokens_per_step": rows * args.seq_length,
        "step_s": step,
        "step_s_spread": [min(times), max(times)],
        "tokens_per_s": tokens_s,
        "mfu": tokens_s * flops_tok / peak if peak else None,
        # The planner's peak counts the CUDA runtime allowance; the allocator does not see it.
        "planned_peak_bytes": plan.peak,
        "planned_peak_without_runtime_bytes": plan.peak - RUNTIME_BYTES,
        "measured_peak_bytes": measured,
        "max_memory_reserved_bytes": reserved,
        # Everything on the card at its highest: what the runtime allowance must cover beyond
        # the allocator's bytes (context, cuBLAS workspaces, cached but unused blocks).
        "card_used_peak_bytes": card.peak if card is not None else None,
        "num_alloc_retries": retries,
    }
    if measured and card is not None:
        result["card_used_minus_allocated_bytes"] = card.peak - measured
    if measured:
        result["measured_over_planned"] = measured / result["planned_peak_without_runtime_bytes"]
    if args.optimizer.startswith("paged"):
        result["note"] = (
            "max_memory_allocated does not see the paged (CUDA managed) optimizer state; "
            "the planner counts it as resident"
        )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
