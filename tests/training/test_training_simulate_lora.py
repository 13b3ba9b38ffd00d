"""The full-size simulation (openchatkit/training/simulate.py) of LoRA and QLoRA runs on tiny
models: LoRA's simulated peak against what the same steps really allocate on CPU, a pp=2 x dp=2
LoRA run, and NF4 / 8-bit Adam counted from their documented layout, that layout checked
against the bytes bitsandbytes really keeps (on CPU, for a 1024 x 2048 weight)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from openchatkit.cli.train import build_parser
from openchatkit.models.shape import ModelShape
from openchatkit.training.config import TrainConfig, read_model_shape
from openchatkit.training.memory import (
    NF4_BYTES_PER_WEIGHT,
    RUNTIME_BYTES,
    TrainSetup,
    plan_memory,
)
from openchatkit.training.simulate import layout_counted, simulate_config, simulate_rank

REPO = Path(__file__).resolve().parents[2]
FLAGS = dict(batch_size=4, micro_batch_size=1, seq_length=16, bf16=True, total_steps=4)
LORA = dict(lora_r=4, lora_dropout=0.05)


def cuda_config(shape: ModelShape, **flags) -> TrainConfig:
    """A `TrainConfig` as the trainer builds it on a CUDA machine, from flags by name."""
    parsed = build_parser().parse_args(["--model-name", "-", "--task-name", "-"])
    vars(parsed).update({"device": "cuda", **flags})
    return TrainConfig.from_flags(parsed, shape, lambda: True, check_files=False)


def adapter_numels(hf, config, stage_index: int = 0) -> tuple[list[int], int]:
    """(numels of the trainable adapter tensors, numel of the layers' base linear weights) of
    one stage, built for real on CPU."""
    from openchatkit.models.lora import apply_lora
    from openchatkit.models.stage import StageModel

    last = stage_index == config.pp - 1
    stage = StageModel(hf, config.layer_ranges[stage_index], stage_index == 0, last)
    linear = sum(m.weight.numel() for m in stage.layers.modules() if isinstance(m, torch.nn.Linear))
    apply_lora(stage, config.lora, seed=config.seed)
    return [p.numel() for p in stage.parameters() if p.requires_grad], linear


def test_lora_simulated_peak_equals_what_a_cpu_run_allocates(tiny):
    """peft's adapters on the fake stage (no refusal any more): the peak equals the same LoRA
    steps' allocations on CPU within 5 %, and only the adapters have fp32 gradients, masters
    and Adam state."""
    from openchatkit.distributed.layout import ParallelLayout
    from openchatkit.models.lora import apply_lora
    from openchatkit.models.stage import StageModel
    from openchatkit.training.engine import TrainEngine
    from openchatkit.training.memory_probe import LiveBytes
    from openchatkit.training.simulate import _batches

    folder = tiny["gpt_neox"]
    config = cuda_config(read_model_shape(folder), **FLAGS, **LORA)
    assert config.lora is not None and layout_counted(config) == []
    hf = AutoConfig.from_pretrained(folder)
    result = simulate_rank(config, hf, 0)
    trainable, _ = adapter_numels(hf, config)
    assert result.parts["masters"] == 4 * sum(trainable)
    assert result.parts["grads"] == 4 * sum(trainable)
    assert (
        8 * sum(trainable) <= result.parts["optimizer"] <= 8 * sum(trainable) + 64 * len(trainable)
    )
    torch.manual_seed(0)
    batches = _batches(config, config.model.vocab_size)
    with LiveBytes(exclude=[t for b in batches for t in b.values()]) as probe:
        stage = StageModel(hf, config.layer_ranges[0], True, True, dtype=torch.bfloat16)
        apply_lora(stage, config.lora, seed=config.seed)
        stage.set_activation_checkpointing(config.activation_checkpointing)
        engine = TrainEngine(stage, ParallelLayout(1, 1, 0), config, device=torch.device("cpu"))
        probe.reset_peak()
        for _ in range(2):
            engine.train_step(batches)
        real = probe.peak
    assert result.peak_bytes == pytest.approx(real, rel=0.05), (result.peak_bytes, real)


def test_lora_pp2_dp2_ranks_run_and_report_each_stage(tiny):
    folder = tiny["llama"]
    shape = read_model_shape(folder)
    config = cuda_config(shape, pipeline_group_size=2, data_group_size=2, **FLAGS, **LORA)
    hf = AutoConfig.from_pretrained(folder)
    plans = plan_memory(ModelShape.from_dict(hf.to_dict()), TrainSetup.from_config(config))
    reports, _ = simulate_config(config, hf, plans, RUNTIME_BYTES)
    assert [r.stage for r in reports] == [0, 1]
    for r in reports:
        trainable, _ = adapter_numels(hf, config, r.stage)
        assert r.parts["grads"] == 4 * sum(trainable) and r.parts["activations"] > 0


def test_qlora_and_8bit_adam_are_counted_from_their_layout(tiny):
    """Same run with --load-in-4bit --optimizer 8bit-adam: the weights differ from plain LoRA's
    by the layers' linears in NF4 instead of bf16, the optimizer state by the 8-bit layout;
    everything else (masters, gradients, activations) is the same simulation."""
    folder = tiny["gpt_neox"]
    shape = read_model_shape(folder)
    hf = AutoConfig.from_pretrained(folder)
    plain = simulate_rank(cuda_config(shape, **FLAGS, **LORA), hf, 0)
    config = cuda_config(shape, **FLAGS, **LORA, load_in_4bit=True, optimizer="8bit-adam")
    counted = layout_counted(config)
    assert len(counted) == 2 and "NF4" in counted[0] and "8-bit Adam" in counted[1]
    q = simulate_rank(config, hf, 0)
    trainable, linear = adapter_numels(hf, config)
    nf4 = math.ceil(linear * NF4_BYTES_PER_WEIGHT)
    assert q.parts["weights"] == plain.parts["weights"] - 2 * linear + nf4
    # Every tiny adapter is under bitsandbytes' 8-bit size: 32-bit state (8 bytes) for each,
    # the same as AdamW's moments.
    state = sum(8 * n if n < 4096 else 2 * n + 8 * math.ceil(n / 256) for n in trainable)
    assert q.parts["optimizer"] == pytest.approx(
        plain.parts["optimizer"] * state / (8 * sum(trainable) + 4 * len(trainable)), abs=2
    )
    for part in ("masters", "grads", "activations"):
        assert q.parts[part] == plain.parts[part], part
    assert q.peak_bytes == sum(q.parts.values())


def test_the_layout_matches_what_bitsandbytes_keeps():
    """The counted bytes per weight (NF4, double quantisation) and per parameter (8-bit AdamW
    state) against bitsandbytes' own tensors for a 1024 x 2048 weight on CPU, within 1 %."""
    bnb = pytest.importorskip("bitsandbytes")

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 2048, bias=False)
    p = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    p = p.to("cpu")
    qs = p.quant_state
    assert qs.nested  # double quantisation, bitsandbytes' default (and quantize_linear_4bit's)
    kept = nbytes(p.data) + nbytes(qs.absmax) + nbytes(qs.code) + nbytes(qs.offset)
    kept += nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
    assert kept / lin.weight.numel() == pytest.approx(NF4_BYTES_PER_WEIGHT, rel=0.01)
    opt = bnb.optim.AdamW8bit(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 1024)).sum().backward()
    opt.step()
    state = sum(nbytes(v) for v in opt.state[lin.weight].values() if torch.is_tensor(v))
    n = lin.weight.numel()
    assert state == pytest.approx(2 * n + 8 * math.ceil(n / 256), rel=0.01)


def test_the_script_says_what_it_counted(tiny, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "training"))
    sys.modules.pop("simulate", None)
    import simulate as script  # training/simulate.py

    folder = tiny["gpt_neox"]
    common = ["--model-name", str(folder), "--task-name", "x", "--seq-length", "16",
              "--batch-size", "2", "--micro-batch-size", "1", "--bf16", "--lora-r", "4"]  # fmt: skip
    assert script.main([*common, "--load-in-4bit", "--optimizer", "paged-8bit-adam"]) == 0
    out = capsys.readouterr().out
    assert "counted from the documented layout, not simulated: NF4" in out and "8-bit" in out
    assert script.main([*common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counted_from_layout"] == [] and report["stages"][0]["parts"]["grads"] > 0
