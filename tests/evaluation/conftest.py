"""Fixtures for the evaluation tests: a tiny random Llama with a small byte-level BPE tokenizer
trained on the bundled chat sample, saved as an HF folder (a few seconds, once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "OIG-sample" / "valid.jsonl"
# Short enough that the long test record spans several of lm-eval's rolling windows.
MAX_POSITIONS = 64


def sample_texts(n: int | None = None) -> list[str]:
    lines = SAMPLE.read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def save_tiny_eval_model(folder: Path, seed: int = 0, vocab: int = 320) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_eval_model(tmp_path_factory.mktemp("tiny-eval") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from openchatkit.models.any_model import load_any_model

    return load_any_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def eval_texts() -> list[str]:
    """Twelve chat records (one window each at MAX_POSITIONS) and one long record spanning
    several windows."""
    return sample_texts(12) + [" ".join(sample_texts(30))]


@pytest.fixture(scope="session")
def sample_file() -> Path:
    return SAMPLE
