"""GPT-J (GPT-J-6B): HF key map and stage module builders.

HF layout: `transformer.wte`, `transformer.h.<i>.*`, `transformer.ln_f`, `lm_head` (with a bias).
GPT-J's rotary tables live inside each attention module (a non-persistent buffer), so no shared
rotary module; transformers offers eager and flash attention only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.gptj.modeling_gptj import GPTJBlock, create_sinusoidal_positions

from openchatkit.models.arch import Architecture, KeyRule

_LAYER = "transformer.h.{i}."
_LAYER_KEYS = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.q_proj.weight",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "attn.out_proj.weight",
    "mlp.fc_in.weight",
    "mlp.fc_in.bias",
    "mlp.fc_out.weight",
    "mlp.fc_out.bias",
]

RULES = (
    KeyRule("embed", "transformer.wte.weight", "wte.weight"),
    *(KeyRule("layer", _LAYER + key, key) for key in _LAYER_KEYS),
    KeyRule("head", "transformer.ln_f.weight", "ln_f.weight"),
    KeyRule("head", "transformer.ln_f.bias", "ln_f.bias"),
    KeyRule("head", "lm_head.weight", "lm_head.weight"),
    KeyRule("head", "lm_head.bias", "lm_head.bias"),
)
# GPT-J-6B's checkpoint stores the causal-mask buffers of each attention module.
IGNORED_HF = (r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$",)


class Embedding(nn.Module):
    """Token embedding: input_ids (B, S) -> hidden (B, S, H)."""

    def __init__(self, config: Any):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(input_ids))


class Head(nn.Module):
    """Final LayerNorm and LM head (GPT-J's has a bias): hidden (B, S, H) -> logits (B, S, V)."""

    def __init__(self, config: Any):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm alone (the trainer fuses the LM head into its loss)."""
        return self.ln_f(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.normalize(hidden))


def build_layer(config: Any, layer_idx: int) -> nn.Module:
    return GPTJBlock(config, layer_idx=layer_idx)


def build_rotary(config: Any) -> None:
    return None  # per-layer tables, see the module docstring


def forward_layer(layer, hidden, attention_mask, position_ids, position_embeddings):
    # Same call as GPTJModel.forward, without a KV cache; GPTJBlock returns (hidden, weights).
    return layer(hidden, attention_mask=attention_mask, position_ids=position_ids)[0]


def materialize_buffers(layer: nn.Module, device: torch.device) -> None:
    """Recompute the sinusoid table (max_positions, rotary_dim) a meta-built block lacks."""
    attn = layer.attn
    attn.embed_positions = create_sinusoidal_positions(attn.max_positions, attn.pos_embd_dim).to(
        device
    )


ARCHITECTURE = Architecture(
    name="gptj",
    model_type="gptj",
    rules=RULES,
    ignored_hf=IGNORED_HF,
    embed_weight="wte.weight",
    lm_head_weight="lm_head.weight",
    build_embedding=Embedding,
    build_layer=build_layer,
    build_head=Head,
    build_rotary=build_rotary,
    forward_layer=forward_layer,
    materialize_buffers=materialize_buffers,
    attn_implementation="eager",
)
