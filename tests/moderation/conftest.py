"""Fixtures for the moderation tests: a character-level tokenizer and tiny random llamas.

One token per character makes a direct log-likelihood computation independent of where a
prompt is cut into pieces, so it can check the Moderator's cached, batched scoring exactly.
"""

from __future__ import annotations

import string

import pytest
import torch

CHARS = string.ascii_letters + string.digits + " \n.,:;!?<>/'-_()[]|"


def make_char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"[\s\S]"), behavior="isolated"
    )  # "." misses "\n"
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_tiny_llama(vocab_size: int, seed: int = 0, window: int = 1024):
    """A random 2-layer llama, small enough to train a few steps in a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=window,
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(char_tokenizer):
    return make_tiny_llama(len(char_tokenizer))


@pytest.fixture(name="make_tiny_llama", scope="session")
def make_tiny_llama_fixture():
    return make_tiny_llama
