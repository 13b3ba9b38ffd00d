"""`--dtype auto` (openchatkit/models/loading.py `pick_dtype`, `declared_dtype`): on a CPU the
weights' own precision, as transformers' dtype="auto" reads it from the config, with half
weights in bf16 only where the CPU has native bf16. The reason, measured: `make demo`'s fp32
fine-tune scores perplexity 4.57 in fp32 and 4.95 in bf16 (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import pytest
import torch

from openchatkit.models import loading


@pytest.mark.parametrize(
    "declared, native, expected",
    [
        ("float32", True, torch.float32),  # an fp32 fine-tune keeps its weights on any CPU
        (None, True, torch.float32),  # no declaration: transformers' default, fp32
        ("bfloat16", True, torch.bfloat16),
        ("float16", True, torch.bfloat16),  # fp16 arithmetic is emulated on CPUs; bf16 is not
        ("bfloat16", False, torch.float32),  # emulated bf16 is slower than fp32
        ("float16", False, torch.float32),
    ],
)
def test_auto_on_cpu_follows_the_weights(monkeypatch, declared, native, expected):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: native)
    assert loading.pick_dtype("auto", "cpu", declared) is expected
    assert loading.pick_dtype("float16", "cpu", "float32") is torch.float16  # asked: given


def test_declared_dtype_reads_either_key(tmp_path):
    for config, expected in [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),  # transformers 4's key
        ({"dtype": None, "torch_dtype": "float32"}, "float32"),
        ({}, None),
        ([1, 2], None),  # not an object: no declaration, no traceback
    ]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert loading.declared_dtype(str(tmp_path)) == expected
    (tmp_path / "config.json").write_text("{not json")
    assert loading.declared_dtype(str(tmp_path)) is None
    assert loading.declared_dtype("no-such-org/no-such-model") is None  # not cached: None
    assert loading.declared_dtype("not a repo id!") is None


def test_folders_load_in_their_own_precision(tmp_path):
    """The embedded model's converted folder stores fp32 (as a `make demo` fine-tune does) and
    loads in fp32; a folder stored in bf16 loads in bf16 on a CPU with native bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from openchatkit.models.embedded import ensure_embedded_model
    from openchatkit.models.loading import cpu_has_native_bf16, load_chat_model

    assert load_chat_model(None, device="cpu").model.dtype == torch.float32
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(ensure_embedded_model()).save_pretrained(tmp_path)
    assert loading.declared_dtype(str(tmp_path)) == "bfloat16"
    half = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert load_chat_model(str(tmp_path), device="cpu").model.dtype == half
