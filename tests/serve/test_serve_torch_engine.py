"""The server's torch backend (transformers' continuous batching manager on the bot's own loaded
model: oneDNN-packed linear layers, grouped-query attention inside SDPA on a CPU) answers as a
plain single-sequence `generate` on an unmodified copy of the model does, token for token."""

from __future__ import annotations

import os

from tests.serve.conftest import CONCURRENT_TEXTS, answers_at_once


def test_concurrent_answers_equal_plain_generate(tiny_chat_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from openchatkit.inference.backends import load_torch_chat_model
    from openchatkit.inference.server_engine import GQA_ENV, SamplingParams, TorchBackend
    from openchatkit.models.packed_linear import PackedLinear

    monkeypatch.delenv(GQA_ENV, raising=False)
    loaded = load_torch_chat_model(str(tiny_chat_dir), device="cpu", dtype="float32")
    assert any(isinstance(m, PackedLinear) for m in loaded.model.modules())
    config = loaded.model.config
    assert config.num_key_value_heads < config.num_attention_heads  # GQA: the switch matters
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()

    prompts = [loaded.tokenizer(t)["input_ids"] for t in CONCURRENT_TEXTS]
    backend = TorchBackend(loaded.model, context_window=256, max_batch=3, kv_tokens=1024)
    params = SamplingParams(max_tokens=12, greedy=True)
    backend.start()
    try:
        assert os.environ.get(GQA_ENV) == "1"
        got = answers_at_once(backend, prompts, params)
    finally:
        backend.stop()
    assert GQA_ENV not in os.environ  # put back as it was
    assert all(len(t) == 12 for t in got)  # no EOS asked for: each runs to max_tokens
    for ids, tokens in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = plain.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )  # fmt: skip
        assert tokens == out[0, len(ids) :].tolist()


def test_gqa_switch_counts_its_users(monkeypatch):
    """Backends started and stopped in any order leave the variable as it was before the first
    (absent, or the user's own value)."""
    from openchatkit.inference.server_engine import GQA_ENV, GqaSwitch

    for before in (None, "0"):
        if before is None:
            monkeypatch.delenv(GQA_ENV, raising=False)
        else:
            monkeypatch.setenv(GQA_ENV, before)
        switch = GqaSwitch()
        switch.acquire()  # backend A starts
        switch.acquire()  # backend B starts
        assert os.environ[GQA_ENV] == "1"
        switch.release()  # A stops first: B still runs
        assert os.environ[GQA_ENV] == "1"
        switch.release()
        assert os.environ.get(GQA_ENV) == before
