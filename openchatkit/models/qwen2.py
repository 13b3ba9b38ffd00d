"""Qwen2 (Qwen2.5-0.5B-Instruct, ...): the Llama layout with biased q/k/v projections, through
transformers' Qwen2 classes (see `openchatkit/models/arch.py` for what a module provides).

HF layout as Llama's (`model.embed_tokens`, `model.layers.<i>.*`, `model.norm`, `lm_head`, absent
when tied as in the small Qwen2.5 models), so the key map is Llama's; q/k/v carry a bias. The
optional sliding-window layers (`use_sliding_window`, off in every released Qwen2.5) are refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from openchatkit.errors import UserError
from openchatkit.models import llama
from openchatkit.models.shape import ModelShape


def build_head(config: Any):
    """Final RMSNorm and an unbiased LM head."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from openchatkit.models.parts import Head

    norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return Head("norm", norm, config.hidden_size, config.vocab_size, bias=False)


def build_layer(config: Any, layer_idx: int):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    if (getattr(config, "layer_types", None) or ["full_attention"] * (layer_idx + 1))[
        layer_idx
    ] != "full_attention":
        raise UserError(
            f"qwen2 layer {layer_idx} uses sliding-window attention (use_sliding_window): "
            "not supported by the stage; only full attention is"
        )
    return Qwen2DecoderLayer(config, layer_idx)


def build_rotary(config: Any):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    return Qwen2RotaryEmbedding(config=config)


def layer_vectors(s: ModelShape) -> list[int]:
    # Two RMSNorms and the q, k, v biases.
    return [s.hidden_size] * 2 + [s.heads * s.head_dim, s.kv_dim, s.kv_dim]


# Llama's layout, conversion rules and activation bytes (a bias add keeps nothing more for the
# backward); its own modules, the q, k, v biases and Qwen2Config's untied default.
ARCHITECTURE = replace(
    llama.ARCHITECTURE,
    name="qwen2",
    model_type="qwen2",
    build_layer=build_layer,
    build_head=build_head,
    build_rotary=build_rotary,
    default_tied=False,  # Qwen2Config's default
    layer_vectors=layer_vectors,
)
