"""Qwen2 and Mistral (one module and one registry line each) in the trainer's engine: pp x dp ranks
equal one process, for full fine-tuning and for LoRA on the default targets, with the in-process
multi-rank harness of `test_training_engine.py` (loaded from that file, not copied).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "_engine_harness", Path(__file__).with_name("test_training_engine.py")
)
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory) -> dict[str, Path]:
    """Tiny layer-sharded Qwen2 (tied, GQA) and Mistral (untied, GQA, a 6-token window shorter
    than the 16-token rows) models with the suite's tokenizer."""
    from transformers import MistralConfig, Qwen2Config

    from openchatkit.models.registry import read_model_type
    from openchatkit.models.stage import StageModel, save_stage
    from openchatkit.training.config import read_model_shape

    vocab = read_model_shape(tiny["llama"]).vocab_size
    assert read_model_type(tiny["llama"]) == "llama"
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    configs = {
        "qwen2": Qwen2Config(tie_word_embeddings=True, **common),
        "mistral": MistralConfig(tie_word_embeddings=False, sliding_window=6, **common),
    }
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        stage = StageModel(config, range(4), True, True)
        with torch.no_grad():  # random biases and norms, so a dropped one shows
            for p in stage.parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.3)
        out[name] = root / name
        save_stage(stage, out[name], write_metadata=True, tokenizer_from=tiny["llama"])
    return out


@pytest.mark.parametrize("arch,pp,dp,mode", [("qwen2", 2, 2, "gpipe"), ("mistral", 2, 2, "1f1b")])
def test_engine_ranks_equal_one_process(folders, tmp_path, arch, pp, dp, mode):
    folder = folders[arch]
    ref = harness._run(folder, harness.COMMON, tmp_path / "ref")[0]
    layout = dict(pipeline_group_size=pp, data_group_size=dp, pp_mode=mode)
    ranks = harness._run(folder, dict(harness.COMMON, **layout), tmp_path / "par")
    harness._assert_ranks_match(ref, ranks)


@pytest.mark.parametrize("arch,pp,dp,mode", [("qwen2", 2, 1, "1f1b"), ("mistral", 2, 1, "gpipe")])
def test_lora_ranks_equal_one_process_and_leave_the_base_alone(
    folders, tmp_path, arch, pp, dp, mode
):
    from openchatkit.models.registry import get_architecture

    folder = folders[arch]
    lora = dict(harness.COMMON, lora_r=4, lora_dropout=0.0)
    ref = harness._run(folder, lora, tmp_path / "ref")[0]
    layout = dict(pipeline_group_size=pp, data_group_size=dp, pp_mode=mode)
    ranks = harness._run(folder, dict(lora, **layout), tmp_path / "par")
    harness._assert_ranks_match(ref, ranks)
    targets = get_architecture(arch).lora_targets
    for got in [ref, *ranks]:
        assert got["trainable"] and all(".lora_" in n for n in got["trainable"])
        # The default targets, in every layer of the stage.
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in got["trainable"]}
        assert adapted == set(targets)
        for name, value in got["params"].items():
            if name in got["trainable"]:
                assert not torch.equal(value, got["initial"][name]), name  # it trained
            else:
                assert torch.equal(value, got["initial"][name]), name  # bit-identical base
