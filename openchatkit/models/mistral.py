"""Mistral (Mistral-7B, ...): the Llama layout with grouped-query attention and an optional
sliding window, through transformers' Mistral classes (see `openchatkit/models/arch.py` for what
a module provides).

HF layout as Llama's, so the key map is Llama's. With `sliding_window` set, a token attends to
the last `sliding_window` positions only: the stage builds HF's sliding-window causal mask (None,
SDPA's causal path, while the sequence fits in the window).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from openchatkit.models import llama
from openchatkit.models.arch import full_causal_mask
from openchatkit.models.shape import ModelShape, standard_sizes


def build_head(config: Any):
    """Final RMSNorm and an unbiased LM head."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from openchatkit.models.parts import Head

    norm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return Head("norm", norm, config.hidden_size, config.vocab_size, bias=False)


def build_layer(config: Any, layer_idx: int):
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    return MistralDecoderLayer(config, layer_idx)


def build_rotary(config: Any):
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    return MistralRotaryEmbedding(config=config)


def causal_mask(config: Any, hidden):
    """As MistralModel.forward: the sliding-window mask when the config has a window."""
    if getattr(config, "sliding_window", None) is None:
        return full_causal_mask(config, hidden)
    from transformers.masking_utils import create_sliding_window_causal_mask

    return create_sliding_window_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None,
        past_key_values=None,
        position_ids=None,
    )


def read_sizes(cfg: dict) -> dict:
    window = cfg.get("sliding_window")
    return standard_sizes(cfg) | {"sliding_window": int(window) if window else None}


def layer_activation_bytes(s: ModelShape, e: int, seq: int) -> float:
    # Llama's with transformers' RMSNorm; with a window shorter than the sequence, SDPA gets an
    # explicit mask and keeps (measured on CPU) an additive copy of it (seq per token) and a
    # contiguous copy of its output (h).
    window = s.sliding_window is not None and s.sliding_window < seq
    extra = (s.hidden_size + seq) * e if window else 0
    return llama.layer_activation_bytes(s, e, seq) + extra


# Llama's layout, conversion rules and parameter counts; its own modules, the sliding-window
# mask, MistralConfig's untied default and the window's extra activation bytes.
ARCHITECTURE = replace(
    llama.ARCHITECTURE,
    name="mistral",
    model_type="mistral",
    build_layer=build_layer,
    build_head=build_head,
    build_rotary=build_rotary,
    causal_mask=causal_mask,
    default_tied=False,  # MistralConfig's default
    read_sizes=read_sizes,
    layer_activation_bytes=layer_activation_bytes,
)
