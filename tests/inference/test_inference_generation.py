"""The decode loop against `model.generate`, sampling controls, and streaming with stops."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from openchatkit.inference.generation import (
    GenerationSettings,
    GenerationStats,
    generate_token_ids,
    pick_next_token,
    stream_text,
)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def test_greedy_matches_hf_generate(tiny_llama):
    prompt = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(1))
    settings = GenerationSettings(max_tokens=40, sample=False)
    ours = list(generate_token_ids(tiny_llama, prompt, settings, eos_token_ids=[]))
    ref = tiny_llama.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=40,
        min_new_tokens=40,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, prompt.shape[1] :].tolist()
    assert ours == ref and len(ours) == 40


def test_eos_ends_generation_and_is_not_yielded(tiny_llama):
    prompt = torch.tensor([[5, 6, 7]])
    settings = GenerationSettings(max_tokens=30, sample=False)
    free = list(generate_token_ids(tiny_llama, prompt, settings, eos_token_ids=[]))
    stop_at = free[4]
    cut = list(generate_token_ids(tiny_llama, prompt, settings, eos_token_ids=[stop_at]))
    assert cut == free[: free.index(stop_at)]


def test_sampling_seeded_and_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    s = GenerationSettings(sample=True, temperature=1.0, top_k=0, top_p=1.0)
    draws = lambda seed, st: [  # noqa: E731
        pick_next_token(logits, st, torch.Generator().manual_seed(seed)) for _ in range(1)
    ]
    assert draws(3, s) == draws(3, s)
    # top_k=2 only ever picks the two best tokens; top_k=1 is greedy.
    gen = torch.Generator().manual_seed(0)
    k2 = GenerationSettings(sample=True, temperature=1.0, top_k=2)
    assert {pick_next_token(logits, k2, gen) for _ in range(200)} == {1, 2}
    k1 = GenerationSettings(sample=True, temperature=1.0, top_k=1)
    assert {pick_next_token(logits, k1, gen) for _ in range(50)} == {1}
    # top_p just above the best token's mass keeps exactly the best two.
    probs = torch.softmax(logits, -1)
    p2 = GenerationSettings(sample=True, temperature=1.0, top_k=0, top_p=float(probs[1]) + 0.01)
    assert {pick_next_token(logits, p2, gen) for _ in range(200)} == {1, 2}
    # temperature 0 or --no-sample: argmax.
    assert pick_next_token(logits, GenerationSettings(temperature=0.0), None) == 1
    assert pick_next_token(logits, GenerationSettings(sample=False), None) == 1


def test_stream_text_stops_at_stop_string(char_tokenizer, scripted_model):
    model = scripted_model(char_tokenizer, " Paris.\n<human>: next question")
    prompt = char_tokenizer("<human>: hi\n<bot>:", return_tensors="pt")["input_ids"]
    stats = GenerationStats()
    pieces = list(
        stream_text(
            model,
            char_tokenizer,
            prompt,
            GenerationSettings(max_tokens=100, sample=False),
            [char_tokenizer.eos_token_id],
            ["<human>:"],
            stats,
        )
    )
    assert "".join(pieces) == " Paris.\n"
    assert not any("<" in p for p in pieces)
    assert stats.stop_reason == "stop_string"
    assert stats.generated_tokens == len(" Paris.\n<human>:")
    assert stats.prompt_tokens == prompt.shape[1]


def test_stream_text_eos_and_max_tokens(char_tokenizer, scripted_model):
    prompt = char_tokenizer("q", return_tensors="pt")["input_ids"]
    eos = [char_tokenizer.eos_token_id]
    stats = GenerationStats()
    text = "".join(
        stream_text(
            scripted_model(char_tokenizer, "ab<h"),
            char_tokenizer,
            prompt,
            GenerationSettings(max_tokens=100, sample=False),
            eos,
            ["<human>:"],
            stats,
        )
    )
    assert text == "ab<h" and stats.stop_reason == "eos"  # held-back "<h" flushed at EOS
    stats = GenerationStats()
    text = "".join(
        stream_text(
            scripted_model(char_tokenizer, "abcdef"),
            char_tokenizer,
            prompt,
            GenerationSettings(max_tokens=3, sample=False),
            eos,
            [],
            stats,
        )
    )
    assert text == "abc" and stats.stop_reason == "max_tokens"
