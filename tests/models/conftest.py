"""Shared helpers for the model tests: tiny random HF causal LMs of each architecture, as fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 96


def tiny_config(kind: str, tied: bool = False, num_layers: int = 4):
    """kind: gpt_neox | gptj | llama."""
    from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig

    if kind == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            rotary_pct=0.5,
            tie_word_embeddings=tied,
        )
    if kind == "gptj":
        return GPTJConfig(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=num_layers,
            n_head=4,
            n_positions=64,
            rotary_dim=4,
            tie_word_embeddings=tied,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
        )
    raise ValueError(kind)


def save_tiny_model(
    folder: Path, kind: str, tied: bool = False, dtype=torch.float32, num_layers: int = 4, seed=0
) -> Path:
    """A random model of `kind` saved with save_pretrained; biases and norms get random values
    too, so a swapped or dropped tensor changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tied, num_layers))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.to(dtype).save_pretrained(folder)
    return folder


def hf_logits(folder: Path, input_ids: torch.Tensor, dtype=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    with torch.no_grad():
        # use_cache=False: the KV-cache path reorders memory and moves GPT-J logits by ~1e-7.
        return model(input_ids, use_cache=False).logits


@pytest.fixture(scope="session")
def make_tiny():
    """Factory: make_tiny(folder, kind, tied=False, dtype=torch.float32, num_layers=4) -> folder."""
    return save_tiny_model


@pytest.fixture(scope="session")
def reference_logits():
    """reference_logits(folder, input_ids) -> HF AutoModelForCausalLM logits (no KV cache)."""
    return hf_logits


@pytest.fixture(scope="session")
def make_config():
    """Factory: make_config(kind, tied=False, num_layers=4) -> a tiny HF config."""
    return tiny_config


def save_tiny_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over VOCAB tokens, saved as HF tokenizer files into `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def add_tokenizer():
    """add_tokenizer(folder) writes a tiny tokenizer's files into an HF folder."""
    return save_tiny_tokenizer
