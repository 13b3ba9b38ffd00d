"""Fixtures for the chat tests: a character-level tokenizer and a scripted fake model."""

from __future__ import annotations

import string
from types import SimpleNamespace

import pytest
import torch

CHARS = string.ascii_letters + string.digits + " \n.,:;!?<>/'-_()[]|"


def make_char_tokenizer(chat_template: str | None = None):
    """A real HF fast tokenizer with one token per character: easy to reason about in tests."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


class ScriptedModel(torch.nn.Module):
    """Emits a fixed text one token per forward call, then EOS; counts its calls."""

    def __init__(self, tokenizer, script: str, context_window: int = 4096):
        super().__init__()
        self.ids = tokenizer(script, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        self.vocab = len(tokenizer)
        self.calls = 0
        self.prompts: list[list[int]] = []
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.config = SimpleNamespace(max_position_embeddings=context_window)

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):
        if past_key_values is None:
            self.prompts.append(input_ids[0].tolist())
            step = 0
        else:
            step = past_key_values + 1
        self.calls += 1
        logits = torch.full((1, 1, self.vocab), -1e9)
        logits[0, 0, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=step)


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(name="make_char_tokenizer")
def make_char_tokenizer_fixture():
    return make_char_tokenizer


@pytest.fixture(name="scripted_model")
def scripted_model_fixture():
    return ScriptedModel
