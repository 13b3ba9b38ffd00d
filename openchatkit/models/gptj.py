"""GPT-J (GPT-J-6B): HF key map, stage module builders, and the facts the planner and the
trainer's config need (see `openchatkit/models/arch.py`).

HF layout: `transformer.wte`, `transformer.h.<i>.*`, `transformer.ln_f`, `lm_head` (with a bias).
GPT-J's rotary tables live inside each attention module (a non-persistent buffer), so no shared
rotary module; transformers offers eager and flash attention only.
"""

from __future__ import annotations

from typing import Any

from openchatkit.models.arch import Architecture, KeyRule
from openchatkit.models.shape import ModelShape

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


def build_embedding(config: Any):
    from openchatkit.models.parts import Embedding

    return Embedding("wte", config.vocab_size, config.n_embd, dropout=config.embd_pdrop)


def build_head(config: Any):
    """Final LayerNorm and LM head (GPT-J's has a bias)."""
    from torch import nn

    from openchatkit.models.parts import Head

    norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return Head("ln_f", norm, config.n_embd, config.vocab_size, bias=True)


def build_layer(config: Any, layer_idx: int):
    from transformers.models.gptj.modeling_gptj import GPTJBlock

    return GPTJBlock(config, layer_idx=layer_idx)


def build_rotary(config: Any) -> None:
    return None  # per-layer tables, see the module docstring


def forward_layer(layer, hidden, attention_mask, position_ids, position_embeddings):
    # Same call as GPTJModel.forward, without a KV cache; GPTJBlock returns (hidden, weights).
    return layer(hidden, attention_mask=attention_mask, position_ids=position_ids)[0]


def materialize_buffers(layer, device) -> None:
    """Recompute the sinusoid table (max_positions, rotary_dim) a meta-built block lacks."""
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    attn = layer.attn
    attn.embed_positions = create_sinusoidal_positions(attn.max_positions, attn.pos_embd_dim).to(
        device
    )


def read_sizes(cfg: dict) -> dict:
    hidden, heads = int(cfg["n_embd"]), int(cfg["n_head"])
    return dict(
        num_layers=int(cfg["n_layer"]),
        hidden_size=hidden,
        vocab_size=int(cfg["vocab_size"]),
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
        rotary_dim=int(cfg.get("rotary_dim") or hidden // heads),
        hidden_act=str(cfg.get("activation_function") or "gelu_new"),
    )


def layer_linears(s: ModelShape) -> dict[str, tuple[int, int]]:
    h, i = s.hidden_size, s.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h),
            "fc_in": (h, i), "fc_out": (i, h)}  # fmt: skip


def layer_vectors(s: ModelShape) -> list[int]:
    # One LayerNorm; unbiased q/k/v/out, biased MLP.
    return [s.hidden_size] * 2 + [s.intermediate_size, s.hidden_size]


def layer_activation_bytes(s: ModelShape, e: int, seq: int) -> float:
    # Eager attention: fp32 scores and probabilities, (heads, seq) per token; gelu_new's
    # intermediates are in the 10 i / 20 i (fitted with GPT-J's own activation).
    h, i, heads = s.hidden_size, s.intermediate_size, s.heads
    if e == 2:
        return 16 * h + 10 * i + 8 * s.rotary_dim + 6 * heads * seq + 4
    return 24 * h + 20 * i + 16 * s.rotary_dim + 4 * heads * seq + 8


def stage_activation_bytes(s: ModelShape, e: int, seq: int, recomputed: bool) -> float:
    # The additive causal mask, (seq, seq) per sequence, is an input of every recomputed layer
    # and lives until the last of them has run its backward.
    return seq * e if recomputed else 0.0


ARCHITECTURE = Architecture(
    name="gptj",
    model_type="gptj",
    rules=RULES,
    ignored_hf=IGNORED_HF,
    embed_weight="wte.weight",
    lm_head_weight="lm_head.weight",
    build_embedding=build_embedding,
    build_layer=build_layer,
    build_head=build_head,
    build_rotary=build_rotary,
    forward_layer=forward_layer,
    materialize_buffers=materialize_buffers,
    attn_implementation="eager",
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    read_sizes=read_sizes,
    layer_linears=layer_linears,
    layer_vectors=layer_vectors,
    head_vectors=lambda s: [s.hidden_size] * 2 + [s.vocab_size],  # LayerNorm, LM head bias
    layer_activation_bytes=layer_activation_bytes,
    stage_activation_bytes=stage_activation_bytes,
    final_norm_bytes=lambda s, e: s.hidden_size * e + 8,
)
