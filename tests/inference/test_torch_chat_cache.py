"""The torch backend's cross-turn KV cache (generation.TorchChatModel), which the chat session uses
by default: the next prompt evaluates only the tokens the cache lacks, and the answers are those
of the model run on the whole prompt, also when the new prompt departs from the cached one in the
middle (a changed system prompt, /load, a window that dropped old turns: the cache is cut back)."""

from __future__ import annotations

import io

import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,  # the character tokenizer's 83 tokens fit
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def uncached(model, ids, n):
    from openchatkit.inference.generation import GenerationSettings, generate_token_ids

    settings = GenerationSettings(max_tokens=n, sample=False)
    return list(generate_token_ids(model, torch.tensor([ids]), settings, []))


def test_cache_is_cut_back_where_the_prompt_departs(tiny):
    from openchatkit.inference.generation import GenerationSettings, TorchChatModel

    settings = GenerationSettings(max_tokens=6, sample=False)
    chat = TorchChatModel(tiny)
    first = list(range(1, 30))
    answer = list(chat.generate_ids(torch.tensor([first]), settings, []))
    assert answer == uncached(tiny, first, 6)
    assert chat.last_evaluated == len(first)
    # The next turn extends the conversation: only the new tokens are evaluated.
    second = first + answer + [40, 41, 42]
    got = list(chat.generate_ids(torch.tensor([second]), settings, []))
    assert chat.last_evaluated == len(second) - len(first) - len(answer) + 1
    assert got == uncached(tiny, second, 6)
    # A prompt that departs at token 10 (another system prompt): the cache is cut to 10 tokens.
    third = first[:10] + [50, 51, 52] + first[10:]
    got = list(chat.generate_ids(torch.tensor([third]), settings, []))
    assert chat.last_evaluated == len(third) - 10
    assert got == uncached(tiny, third, 6)
    assert chat.cached[: len(third)] == third


def test_session_uses_the_cache_by_default(tiny, char_tokenizer):
    from openchatkit.inference.generation import GenerationSettings, TorchChatModel
    from openchatkit.inference.session import ChatSession
    from openchatkit.models.loading import LoadedModel

    assert len(char_tokenizer) <= tiny.config.vocab_size
    loaded = LoadedModel(tiny, char_tokenizer, "tiny", "cpu", "float32", 256)
    session = ChatSession(
        loaded, GenerationSettings(max_tokens=4, sample=False), out=io.StringIO(), err=io.StringIO()
    )
    assert isinstance(session.chat_model, TorchChatModel)
    session.say("hi")
    first_prompt = session.last_stats.prompt_tokens
    session.say("yo")
    # The first turn's prompt is a prefix of the second's: it is not evaluated again.
    assert session.chat_model.last_evaluated <= session.last_stats.prompt_tokens - first_prompt
