"""Fixtures for the chat tests: a character-level tokenizer and a scripted fake model."""

from __future__ import annotations

import string
from pathlib import Path
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


def make_tiny_gguf_source(
    folder: Path,
    kind: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    std: float = 0.1,
) -> Path:
    """A tiny random Llama (grouped-query, tied embeddings) or GPT-NeoX (partial rotary, untied)
    saved as an HF folder with the embedded model's tokenizer (49152 tokens, so llama.cpp loads
    a real vocabulary), for the GGUF export tests: weights N(0, std), norm weights around 1,
    biases random, so that logits are peaked and distinct. Seeded: the same folder every time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig

    from openchatkit.models.embedded import ensure_embedded_model

    common = dict(
        vocab_size=49152,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=ffn,
        max_position_embeddings=256,
    )
    if kind == "llama":
        config = LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # rotary_pct becomes rope_parameters.partial_rotary_factor in transformers 5
        config = GPTNeoXConfig(**common, rotary_pct=0.5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_embedded_model()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", name="make_tiny_gguf_source")
def make_tiny_gguf_source_fixture():
    return make_tiny_gguf_source


def gguf_exports(folder: Path, base: Path, stem: str):
    """get(outtype) -> `folder` exported to `base/<stem>.<outtype>.gguf`, once per outtype: the
    tests that read one file share it (none writes to it)."""
    from openchatkit.export.gguf import export_gguf

    files: dict[str, Path] = {}

    def get(outtype: str) -> Path:
        if outtype not in files:
            files[outtype] = export_gguf(str(folder), base / f"{stem}.{outtype}.gguf", outtype)
        return files[outtype]

    return get


@pytest.fixture(scope="session", name="gguf_exports")
def gguf_exports_fixture():
    return gguf_exports
