"""Llama (Llama-2-7B-32K, SmolLM2): HF key map, stage module builders, and the facts the planner
and the trainer's config need (see `openchatkit/models/arch.py`).

HF layout: `model.embed_tokens`, `model.layers.<i>.*`, `model.norm`, `lm_head` (absent when the
embeddings are tied, as in SmolLM2). Later decoders of the same layout (Qwen2, Mistral) reuse the
builders and formulas below with their own transformers classes.
"""

from __future__ import annotations

from typing import Any

from openchatkit.models.arch import Architecture, KeyRule
from openchatkit.models.shape import ModelShape

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


def build_embedding(config: Any):
    from openchatkit.models.parts import Embedding

    # padding_idx as in LlamaModel: that row gets no gradient.
    return Embedding(
        "embed_tokens", config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
    )


def build_head(config: Any):
    """Final RMSNorm and an unbiased LM head."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from openchatkit.models.parts import Head

    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return Head("norm", norm, config.hidden_size, config.vocab_size, bias=False)


def build_layer(config: Any, layer_idx: int):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer(config, layer_idx)


def build_rotary(config: Any):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config=config)


def layer_linears(s: ModelShape) -> dict[str, tuple[int, int]]:
    # q/o, grouped-query k/v, gated MLP.
    h, i, q, kv = s.hidden_size, s.intermediate_size, s.heads * s.head_dim, s.kv_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def layer_vectors(s: ModelShape) -> list[int]:
    return [s.hidden_size] * 2  # two RMSNorms; no biases


def layer_activation_bytes(s: ModelShape, e: int, seq: int) -> float:
    # transformers' RMSNorm keeps fp32 copies of its input and of the normalised x * r whatever
    # the dtype (8 h bytes for the layer's two norms). Besides: 6 h model-dtype tensors; gate,
    # SiLU, up and their product (4 i); GQA k/v (2 kv); SDPA's fp32 log-sum-exp per head.
    h = s.hidden_size
    return 6 * h * e + 8 * h + 4 * s.intermediate_size * e + 2 * s.kv_dim * e + 4 * s.heads + 8


def stage_activation_bytes(s: ModelShape, e: int, seq: int, recomputed: bool) -> float:
    # cos/sin tables, (seq, rotary) each, shared by the stage's layers; in half precision also
    # the fp32 originals of the copies, unless the layers are recomputed.
    return 2 * s.rotary_dim * e + (4 * s.rotary_dim if e == 2 and not recomputed else 0)


def final_norm_bytes(s: ModelShape, e: int) -> float:
    # transformers' RMSNorm works in fp32 (measured: 8 h + 4 in bf16 and in fp32).
    return 8 * s.hidden_size + 4


ARCHITECTURE = Architecture(
    name="llama",
    model_type="llama",
    rules=RULES,
    ignored_hf=IGNORED_HF,
    embed_weight="embed_tokens.weight",
    lm_head_weight="lm_head.weight",
    build_embedding=build_embedding,
    build_layer=build_layer,
    build_head=build_head,
    build_rotary=build_rotary,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    layer_linears=layer_linears,
    layer_vectors=layer_vectors,
    head_vectors=lambda s: [s.hidden_size],  # the final RMSNorm
    layer_activation_bytes=layer_activation_bytes,
    stage_activation_bytes=stage_activation_bytes,
    final_norm_bytes=final_norm_bytes,
)
