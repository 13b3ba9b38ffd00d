"""Llama (Llama-2-7B-32K, SmolLM2): HF key map and stage module builders.

HF layout: `model.embed_tokens`, `model.layers.<i>.*`, `model.norm`, `lm_head` (absent when the
embeddings are tied, as in SmolLM2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from openchatkit.models.arch import Architecture, KeyRule

_LAYER = "model.layers.{i}."
_LAYER_KEYS = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")),
    *(f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "bias")),
]

RULES = (
    KeyRule("embed", "model.embed_tokens.weight", "embed_tokens.weight"),
    *(KeyRule("layer", _LAYER + key, key) for key in _LAYER_KEYS),
    KeyRule("head", "model.norm.weight", "norm.weight"),
    KeyRule("head", "lm_head.weight", "lm_head.weight"),
)
# Checkpoints saved by transformers < 4.31 store the rotary inverse frequencies.
IGNORED_HF = (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)


class Embedding(nn.Module):
    """Token embedding: input_ids (B, S) -> hidden (B, S, H)."""

    def __init__(self, config: Any):
        super().__init__()
        # padding_idx as in LlamaModel: that row gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class Head(nn.Module):
    """Final RMSNorm and LM head: hidden (B, S, H) -> logits (B, S, V)."""

    def __init__(self, config: Any):
        super().__init__()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm alone (the trainer fuses the LM head into its loss)."""
        return self.norm(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.normalize(hidden))


def build_layer(config: Any, layer_idx: int) -> nn.Module:
    return LlamaDecoderLayer(config, layer_idx)


def build_rotary(config: Any) -> nn.Module:
    return LlamaRotaryEmbedding(config=config)


ARCHITECTURE = Architecture(
    name="llama",
    model_type="llama",
    rules=RULES,
    ignored_hf=IGNORED_HF,
    embed_weight="embed_tokens.weight",
    lm_head_weight="lm_head.weight",
    build_embedding=Embedding,
    build_layer=build_layer,
    build_head=Head,
    build_rotary=build_rotary,
)
