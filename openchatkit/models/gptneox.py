"""GPT-NeoX (GPT-NeoX-20B, Pythia, RedPajama-INCITE): HF key map, stage module builders, and the
facts the planner and the trainer's config need (see `openchatkit/models/arch.py`).

HF layout: `gpt_neox.embed_in`, `gpt_neox.layers.<i>.*`, `gpt_neox.final_layer_norm`, and the LM
head saved as `embed_out` (transformers 5 names the module `lm_head` but keeps `embed_out` on disk).
"""

from __future__ import annotations

from typing import Any

from openchatkit.models.arch import Architecture, KeyRule
from openchatkit.models.shape import ModelShape

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

# MLP-width tensors an activation keeps for its backward beyond its input (measured with
# memory_probe.LiveBytes, tests/models/test_models_arch.py): torch's GELU keeps only its input;
# transformers' FastGELUActivation (`gelu_fast`, GPT-NeoX-20B's) is a chain of elementwise ops
# that keeps six intermediates, NewGELUActivation (`gelu_new`) three.
ACTIVATION_EXTRA = {"gelu": 0, "gelu_fast": 6, "gelu_new": 3}


def build_embedding(config: Any):
    from openchatkit.models.parts import Embedding

    return Embedding(
        "embed_in", config.vocab_size, config.hidden_size,
        dropout=config.hidden_dropout, dropout_name="emb_dropout",
    )  # fmt: skip


def build_head(config: Any):
    from torch import nn

    from openchatkit.models.parts import Head

    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return Head("final_layer_norm", norm, config.hidden_size, config.vocab_size, bias=False)


def build_layer(config: Any, layer_idx: int):
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

    return GPTNeoXLayer(config, layer_idx)


def build_rotary(config: Any):
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    return GPTNeoXRotaryEmbedding(config=config)


def read_sizes(cfg: dict) -> dict:
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return dict(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        vocab_size=int(cfg["vocab_size"]),
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(cfg["intermediate_size"]),
        rotary_dim=int(hidden // heads * cfg.get("rotary_pct", 0.25)),
        hidden_act=str(cfg.get("hidden_act") or "gelu"),
    )


def layer_linears(s: ModelShape) -> dict[str, tuple[int, int]]:
    h, i = s.hidden_size, s.intermediate_size
    return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i),
            "dense_4h_to_h": (i, h)}  # fmt: skip


def layer_vectors(s: ModelShape) -> list[int]:
    # Two LayerNorms (weight, bias), and every linear is biased.
    h = s.hidden_size
    return [h] * 4 + [3 * h, h, s.intermediate_size, h]


def layer_activation_bytes(s: ModelShape, e: int, seq: int) -> float:
    # LN out, fused qkv, rotated q and k, attention out + its transpose, LN out, residual out
    # (10 h); MLP in and activation out (2 i) and what the activation keeps; SDPA's fp32
    # log-sum-exp per head; LN statistics.
    h, i = s.hidden_size, s.intermediate_size
    if s.hidden_act not in ACTIVATION_EXTRA:
        raise ValueError(f"gpt_neox hidden_act {s.hidden_act!r}: no memory formula for it")
    return 10 * h * e + (2 + ACTIVATION_EXTRA[s.hidden_act]) * i * e + 4 * s.heads + 4 * e


def stage_activation_bytes(s: ModelShape, e: int, seq: int, recomputed: bool) -> float:
    return 2 * s.rotary_dim * e  # cos/sin tables, (seq, rotary) each, shared by the layers


ARCHITECTURE = Architecture(
    name="gptneox",
    model_type="gpt_neox",
    rules=RULES,
    ignored_hf=IGNORED_HF,
    embed_weight="embed_in.weight",
    lm_head_weight="lm_head.weight",
    build_embedding=build_embedding,
    build_layer=build_layer,
    build_head=build_head,
    build_rotary=build_rotary,
    lora_targets=("query_key_value",),
    default_tied=False,  # GPTNeoXConfig unties unless told
    read_sizes=read_sizes,
    layer_linears=layer_linears,
    layer_vectors=layer_vectors,
    head_vectors=lambda s: [s.hidden_size] * 2,  # the final LayerNorm; no LM head bias
    layer_activation_bytes=layer_activation_bytes,
    stage_activation_bytes=stage_activation_bytes,
    final_norm_bytes=lambda s, e: s.hidden_size * e + 8,  # its output and fp32 statistics
)
