"""The full-size simulation (openchatkit/training/simulate.py, training/simulate.py) on tiny
models: a pp=2 x dp=2 run of the real engine over the fake process group, its peak against what
the same steps really allocate on CPU, a planted host tensor named, and the script's refusals
and its not-fit exit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from openchatkit.cli.train import build_parser
from openchatkit.models.shape import ModelShape
from openchatkit.training import loss as loss_module
from openchatkit.training.config import TrainConfig, read_model_shape
from openchatkit.training.memory import RUNTIME_BYTES, TrainSetup, plan_memory
from openchatkit.training.simulate import (
    PHASES,
    SimulatedDeviceError,
    simulate_config,
    simulate_rank,
)

REPO = Path(__file__).resolve().parents[2]
FLAGS = dict(batch_size=4, micro_batch_size=1, seq_length=16, bf16=True, total_steps=4)


def cuda_config(shape: ModelShape, **flags) -> TrainConfig:
    """A `TrainConfig` as the trainer builds it on a CUDA machine (device cuda and its
    defaults: NCCL, checkpointing on), from flags by name, without touching files."""
    parsed = build_parser().parse_args(["--model-name", "-", "--task-name", "-"])
    vars(parsed).update({"device": "cuda", **flags})
    return TrainConfig.from_flags(parsed, shape, lambda: True, check_files=False)


def _plans(folder: Path, config):
    shape = ModelShape.from_dict(AutoConfig.from_pretrained(folder).to_dict())
    return plan_memory(shape, TrainSetup.from_config(config))


def test_pp2_dp2_ranks_run_the_engine_and_report_each_stage(tiny):
    folder = tiny["gpt_neox"]
    config = cuda_config(
        read_model_shape(folder), pipeline_group_size=2, data_group_size=2, **FLAGS
    )
    # As on CUDA: layer checkpointing by default, bf16 weights under fp32 masters.
    assert config.device == "cuda" and config.activation_checkpointing == "layers"
    hf = AutoConfig.from_pretrained(folder)
    reports, seconds = simulate_config(config, hf, _plans(folder, config), RUNTIME_BYTES)
    assert [r.stage for r in reports] == [0, 1] and seconds > 0
    from openchatkit.models.stage import StageModel

    for r in reports:
        stage = StageModel(hf, config.layer_ranges[r.stage], r.stage == 0, r.stage == 1)
        trainable = sum(p.numel() for p in stage.parameters())
        assert r.phase in PHASES
        # bf16 weights; fp32 masters; fp32 gradient buckets; Adam's two fp32 moments (plus
        # fused AdamW's per-parameter step counters on the device).
        assert r.parts["masters"] == 4 * trainable
        assert r.parts["grads"] == 4 * trainable
        assert (
            8 * trainable
            <= r.parts["optimizer"]
            <= 8 * trainable + 64 * len(list(stage.parameters()))
        )
        assert r.parts["activations"] > 0
        assert r.simulated_bytes == RUNTIME_BYTES + sum(r.parts.values())


def test_simulated_peak_equals_what_a_cpu_run_allocates(tiny):
    """The same config and steps really run on CPU under the memory probe: its peak after the
    engine is built equals the simulated device peak within 5 %."""
    from openchatkit.distributed.layout import ParallelLayout
    from openchatkit.models.stage import StageModel
    from openchatkit.training.engine import TrainEngine
    from openchatkit.training.memory_probe import LiveBytes
    from openchatkit.training.simulate import _batches

    folder = tiny["gpt_neox"]
    config = cuda_config(read_model_shape(folder), **FLAGS)
    hf = AutoConfig.from_pretrained(folder)
    simulated = simulate_rank(config, hf, 0).peak_bytes
    torch.manual_seed(0)
    batches = _batches(config, config.model.vocab_size)
    with LiveBytes(exclude=[t for b in batches for t in b.values()]) as probe:
        stage = StageModel(hf, config.layer_ranges[0], True, True, dtype=torch.bfloat16)
        stage.set_activation_checkpointing(config.activation_checkpointing)
        engine = TrainEngine(stage, ParallelLayout(1, 1, 0), config, device=torch.device("cpu"))
        probe.reset_peak()
        for _ in range(2):
            engine.train_step(batches)
        real = probe.peak
    assert simulated == pytest.approx(real, rel=0.05), (simulated, real)


def test_a_host_tensor_planted_in_the_loss_is_named(tiny, monkeypatch):
    original = loss_module.shifted_targets

    def planted(labels):  # a host tensor of the targets' shape, as `torch.zeros(n)` would be
        target = original(labels)
        return target + torch.zeros(target.shape[0], dtype=target.dtype)

    monkeypatch.setattr(loss_module, "shifted_targets", planted)
    folder = tiny["gpt_neox"]
    config = cuda_config(read_model_shape(folder), **FLAGS)
    with pytest.raises(SimulatedDeviceError) as err:
        simulate_rank(config, AutoConfig.from_pretrained(folder), 0)
    message = str(err.value)
    assert "aten.add" in message and "host tensor (16,) int64" in message, message
    assert "test_training_simulate.py" in message or "loss.py" in message, message


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--recipe", "training/no-such-recipe.sh"], ["--recipe", "no such file"]),
        # The trainer's own refusal (NF4 is QLoRA's base: LoRA only); LoRA, QLoRA and 8-bit
        # Adam themselves are simulated (tests/training/test_training_simulate_lora.py).
        (["--model-name", "{tiny}", "--load-in-4bit"], ["--load-in-4bit"]),
        (["--model-name", "{tiny}", "--steps", "0"], ["--steps"]),
        (
            ["--model-name", "{tiny}", "--batch-size", "4", "--micro-batch-size", "3"],
            ["--micro-batch-size 3"],
        ),
    ],
)
def test_bad_input_gets_the_trainers_one_line_refusals(cli, tiny, args, needles, in_process):
    """simulate.py's main(argv) in this process (`in_process`, through run_main as its __main__
    does); the subprocess table in tests/test_bad_input.py proves the one-line contract for
    the real process (its --recipe row)."""
    args = [a.replace("{tiny}", str(tiny["gpt_neox"])) for a in args]
    proc = in_process("training/simulate.py", *args)
    cli.assert_one_line_error(proc, *needles)


def test_a_run_that_does_not_fit_prints_the_table_and_exits_1(tiny, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "training"))
    sys.modules.pop("simulate", None)
    import simulate as script  # training/simulate.py

    folder = tiny["gpt_neox"]
    code = script.main(
        ["--model-name", str(folder), "--task-name", "x", "--seq-length", "16",
         "--batch-size", "2", "--micro-batch-size", "1", "--bf16", "--gpu-memory", "0.5"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    assert "plan/sim" in out and "does not fit in 0.5 GiB" in out
    assert err.startswith("will not fit: stage 0") and "short" in err
