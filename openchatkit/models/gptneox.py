"""GPT-NeoX (GPT-NeoX-20B, Pythia, RedPajama-INCITE): HF key map and stage module builders.

HF layout: `gpt_neox.embed_in`, `gpt_neox.layers.<i>.*`, `gpt_neox.final_layer_norm`, and the LM
head saved as `embed_out` (transformers 5 names the module `lm_head` but keeps `embed_out` on disk).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

from openchatkit.models.arch import Architecture, KeyRule

_LAYER = "gpt_neox.layers.{i}."
_LAYER_KEYS = [
    f"{module}.{param}"
    for module in (
        "input_layernorm",
        "post_attention_layernorm",
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    )
    for param in ("weight", "bias")
]

RULES = (
    KeyRule("embed", "gpt_neox.embed_in.weight", "embed_in.weight"),
    *(KeyRule("layer", _LAYER + key, key) for key in _LAYER_KEYS),
    KeyRule("head", "gpt_neox.final_layer_norm.weight", "final_layer_norm.weight"),
    KeyRule("head", "gpt_neox.final_layer_norm.bias", "final_layer_norm.bias"),
    KeyRule("head", "embed_out.weight", "lm_head.weight"),
)
# Old checkpoints (GPT-NeoX-20B, Pythia) store the causal-mask and rotary buffers.
IGNORED_HF = (r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$",)


class Embedding(nn.Module):
    """Token embedding: input_ids (B, S) -> hidden (B, S, H)."""

    def __init__(self, config: Any):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb_dropout(self.embed_in(input_ids))


class Head(nn.Module):
    """Final LayerNorm and LM head: hidden (B, S, H) -> logits (B, S, V)."""

    def __init__(self, config: Any):
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm alone (the trainer fuses the LM head into its loss)."""
        return self.final_layer_norm(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.normalize(hidden))


def build_layer(config: Any, layer_idx: int) -> nn.Module:
    return GPTNeoXLayer(config, layer_idx)


def build_rotary(config: Any) -> nn.Module:
    return GPTNeoXRotaryEmbedding(config=config)


ARCHITECTURE = Architecture(
    name="gptneox",
    model_type="gpt_neox",
    rules=RULES,
    ignored_hf=IGNORED_HF,
    embed_weight="embed_in.weight",
    lm_head_weight="lm_head.weight",
    build_embedding=Embedding,
    build_layer=build_layer,
    build_head=Head,
    build_rotary=build_rotary,
)
