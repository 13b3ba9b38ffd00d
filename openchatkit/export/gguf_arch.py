"""How each architecture the kit trains maps onto llama.cpp's GGUF graph: data keyed by the HF
`model_type` of the registry (openchatkit/models/registry.py).

An entry names llama.cpp's architecture, the hyperparameters it reads (GGUF keys written through
`gguf.GGUFWriter.add_<key>`), and the per-tensor layout changes llama.cpp's graph expects. Tensor
names come from the `gguf` package's own HF-name table (`gguf.get_tensor_name_map`), the table
llama.cpp's converter uses. Adding an architecture llama.cpp runs is one entry here.

Layout changes, with shapes (rows = output features, as HF stores nn.Linear weights):
- Llama/Mistral: HF rotates the two halves of each head ("rotate half"); llama.cpp's llama graph
  rotates adjacent pairs (GGML_ROPE_TYPE_NORM). q_proj (heads*head_dim, hidden) and k_proj
  (kv_heads*head_dim, hidden) rows are permuted within each head so that both give the same
  attention: (h, 2, d/2, ...) -> (h, d/2, 2, ...).
- GPT-NeoX: HF's fused query_key_value rows are interleaved per head, (heads, 3, head_dim);
  llama.cpp splits the fused tensor as [all q; all k; all v], (3, heads, head_dim).
- Qwen2: none (llama.cpp runs it with NeoX-style rotation, HF's own).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gguf

from openchatkit.errors import UserError

if TYPE_CHECKING:  # torch only types the transforms here: the checks run without it
    import torch

# Refused architectures: HF model_type -> why, said in one line.
REFUSED = {
    "gptj": (
        "GPT-J cannot be exported to GGUF: llama.cpp has no GPT-J graph (its own converter "
        "refuses GPTJForCausalLM); chat with it through --backend torch"
    ),
}


def rope_theta(config: Any) -> float:
    """The rotary base, from transformers 5's `rope_parameters` or the older `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rotary_fraction(config: Any) -> float:
    """GPT-NeoX's share of each head that is rotated. transformers 5 writes it as
    rope_parameters.partial_rotary_factor and drops `rotary_pct` (on which llama.cpp's own
    converter fails with KeyError); older configs have `rotary_pct`."""
    params = getattr(config, "rope_parameters", None) or {}
    for value in (
        params.get("partial_rotary_factor"),
        getattr(config, "partial_rotary_factor", None),
        getattr(config, "rotary_pct", None),
    ):
        if value is not None:
            return float(value)
    return 1.0


def _check_rope_type(config: Any) -> None:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(
            f"rope scaling {kind!r} is not supported by the GGUF exporter yet (only plain rotary)"
        )


def _head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def llama_hparams(config: Any) -> list[tuple[str, Any]]:
    """GGUF hyperparameters of a Llama-shaped model (Llama, Mistral, Qwen2)."""
    _check_rope_type(config)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = _head_dim(config)
    out = [
        ("context_length", int(config.max_position_embeddings)),
        ("embedding_length", int(config.hidden_size)),
        ("block_count", int(config.num_hidden_layers)),
        ("feed_forward_length", int(config.intermediate_size)),
        ("head_count", heads),
        ("head_count_kv", kv_heads),
        ("rope_dimension_count", head_dim),
        ("layer_norm_rms_eps", float(config.rms_norm_eps)),
        ("rope_freq_base", rope_theta(config)),
    ]
    if head_dim != config.hidden_size // heads:
        out += [("key_length", head_dim), ("value_length", head_dim)]
    return out


def gptneox_hparams(config: Any) -> list[tuple[str, Any]]:
    """GGUF hyperparameters of a GPT-NeoX model."""
    _check_rope_type(config)
    head_dim = config.hidden_size // config.num_attention_heads
    return [
        ("context_length", int(config.max_position_embeddings)),
        ("embedding_length", int(config.hidden_size)),
        ("block_count", int(config.num_hidden_layers)),
        ("feed_forward_length", int(config.intermediate_size)),
        ("rope_dimension_count", int(rotary_fraction(config) * head_dim)),
        ("head_count", int(config.num_attention_heads)),
        ("parallel_residual", bool(getattr(config, "use_parallel_residual", True))),
        ("layer_norm_eps", float(config.layer_norm_eps)),
        ("rope_freq_base", rope_theta(config)),
    ]


def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's adjacent-pair rows, per head (see the module doc)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama_transform(key: str, w: torch.Tensor, config: Any) -> torch.Tensor:
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return permute_rotary(w, int(config.num_attention_heads))
    if key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return permute_rotary(w, int(kv))
    return w


def gptneox_transform(key: str, w: torch.Tensor, config: Any) -> torch.Tensor:
    if key.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
        heads = int(config.num_attention_heads)
        head_dim = config.hidden_size // heads
        # (heads, 3, head_dim, ...) -> (3, heads, head_dim, ...): q rows, then k, then v.
        rest = w.shape[1:]
        return w.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(w.shape)
    return w


def no_transform(key: str, w: torch.Tensor, config: Any) -> torch.Tensor:
    return w


@dataclass(frozen=True)
class GGUFArch:
    """One architecture's GGUF mapping."""

    arch: gguf.MODEL_ARCH
    hparams: Callable[[Any], list[tuple[str, Any]]]
    transform: Callable[[str, torch.Tensor, Any], torch.Tensor]
    # HF keys that are buffers, not weights (regexes).
    ignored: tuple[str, ...] = ()
    # llama.cpp's graph needs output.weight even when the model ties it to the embedding.
    output_required: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def is_ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignored)


_LLAMA = GGUFArch(
    gguf.MODEL_ARCH.LLAMA, llama_hparams, llama_transform, (r"rotary_emb\.inv_freq$",)
)
# HF model_type -> mapping. Mistral is the llama graph (as llama.cpp's converter does).
GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": GGUFArch(gguf.MODEL_ARCH.QWEN2, llama_hparams, no_transform, (r"inv_freq$",)),
    "gpt_neox": GGUFArch(
        gguf.MODEL_ARCH.GPTNEOX,
        gptneox_hparams,
        gptneox_transform,
        (r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$",),
        output_required=True,
    ),
}


def gguf_arch_for(model_type: str, what: str) -> GGUFArch:
    """The mapping for an HF model_type; a one-line UserError naming `what` otherwise."""
    if model_type in REFUSED:
        raise UserError(f"{what}: {REFUSED[model_type]}")
    if model_type not in GGUF_ARCHS:
        raise UserError(
            f"{what}: architecture {model_type!r} cannot be exported to GGUF; supported are "
            f"{', '.join(GGUF_ARCHS)}"
        )
    return GGUF_ARCHS[model_type]
