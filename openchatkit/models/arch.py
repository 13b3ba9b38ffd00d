"""What every architecture module (`gptneox.py`, `gptj.py`, `llama.py`, ...) provides.

An `Architecture` pairs a declarative key map (HF checkpoint key <-> our layer-sharded key, with a
small named transform per entry) with builders for the three kinds of module a pipeline stage
holds: the token embedding, one transformer layer (the transformers class itself, so the numerics
are HF's), and the head (final norm + LM head). It also carries what the rest of the kit must
know about the architecture without building it: how its config.json names the sizes, whether
it ties embeddings by default, its LoRA targets, its parameter counts and the bytes its layers
keep for the backward (the memory planner's formulas, `openchatkit/training/memory.py`). A new
architecture is one new file of that shape and one line in the registry.

Importing this module (and an architecture module) loads neither torch nor transformers: the
builders import them when called, so the trainer's flag checks stay fast.

Our keys are relative to their file: `embeddings.safetensors`, `layer_XXXXX.safetensors` or
`head.safetensors` (see `openchatkit/models/sharded.py`). The list of architectures is
`openchatkit/models/registry.py`; this module imports none of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError
from openchatkit.models.shape import standard_sizes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from openchatkit.models.shape import ModelShape

PARTS = ("embed", "layer", "head")


@dataclass(frozen=True)
class Transform:
    """A named, invertible change applied to a tensor while converting (split, merge, permute)."""

    name: str
    to_ours: Callable[[torch.Tensor, Any], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Any], torch.Tensor]


# The three architectures below use the transformers modules themselves, so their tensors are
# stored as HF stores them; the transform slot is there for layouts that differ (fused QKV, ...).
IDENTITY = Transform("identity", lambda t, config: t, lambda t, config: t)


@dataclass(frozen=True)
class KeyRule:
    """One tensor: `hf` is the HF checkpoint key (`{i}` = global layer index), `ours` the key
    inside the part's file."""

    part: str
    hf: str
    ours: str
    transform: Transform = IDENTITY


def forward_layer_by_keywords(layer, hidden, attention_mask, position_ids, position_embeddings):
    """The layer call of GPTNeoXModel / LlamaModel.forward without a KV cache: (B,S,H) -> (B,S,H)."""
    return layer(
        hidden,
        attention_mask=attention_mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
    )


def no_buffers(layer: nn.Module, device: torch.device) -> None:
    """For layers that hold no buffers (rotary tables live in the stage's shared rotary module)."""


def full_causal_mask(config: Any, hidden: torch.Tensor) -> torch.Tensor | None:
    """The mask HF builds for a batch without padding: None under SDPA (its is_causal path), an
    additive (B, 1, S, S) mask under eager. position_ids=None: packed rows attend causally
    across documents, as the trainer's data expects."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None,
        past_key_values=None,
        position_ids=None,
    )


def no_stage_bytes(shape: ModelShape, e: int, seq: int, recomputed: bool) -> float:
    """For architectures whose layers share nothing kept per token (see `Architecture`)."""
    return 0.0


@dataclass(frozen=True)
class Architecture:
    """An architecture's key map and module builders (see the module docstring)."""

    name: str  # our name: gptneox | gptj | llama | ... (also the converter script suffix)
    model_type: str  # HF `config.model_type`
    rules: tuple[KeyRule, ...]
    # HF keys that are recomputed buffers in old checkpoints (rotary inv_freq, causal-mask
    # `bias`), matched as regular expressions; everything else unmapped is an error.
    ignored_hf: tuple[str, ...]
    embed_weight: str  # key in embeddings.safetensors of the token embedding (tied weight)
    lm_head_weight: str  # key in head.safetensors of the LM head weight
    build_embedding: Callable[[Any], nn.Module]
    build_layer: Callable[[Any, int], nn.Module]
    build_head: Callable[[Any], nn.Module]
    build_rotary: Callable[[Any], nn.Module | None]
    # (layer, hidden (B,S,H), mask, position_ids (1|B,S), position_embeddings) -> hidden (B,S,H)
    forward_layer: Callable[..., torch.Tensor] = forward_layer_by_keywords
    # Recompute non-persistent buffers of a layer built on the meta device.
    materialize_buffers: Callable[[nn.Module, torch.device], None] = no_buffers
    attn_implementation: str = "sdpa"  # when the config names none
    # (config, hidden (B,S,H)) -> the attention mask every layer of a stage gets.
    causal_mask: Callable[[Any, torch.Tensor], torch.Tensor | None] = full_causal_mask

    # -- facts, without building anything (torch-free) -------------------------------------
    # The modules LoRA adapts by default (the attention projections, as the original's LoRA
    # example and PEFT's own defaults do).
    lora_targets: tuple[str, ...] = ()
    # transformers' default for `tie_word_embeddings` when config.json does not say.
    default_tied: bool = True
    # config.json mapping -> the ModelShape fields other than model_type and the tie.
    read_sizes: Callable[[dict], dict] = standard_sizes
    # shape -> {linear module name: (in, out)} of one layer (LoRA targets, NF4, parameters).
    layer_linears: Callable[[ModelShape], dict[str, tuple[int, int]]] = lambda shape: {}
    # shape -> sizes of one layer's 1-D parameters (norms, biases), and of the head's.
    layer_vectors: Callable[[ModelShape], list[int]] = lambda shape: []
    head_vectors: Callable[[ModelShape], list[int]] = lambda shape: []
    # Bytes per token the planner counts (openchatkit/training/memory.py), `e` the model
    # dtype's size: what one layer keeps for its backward without recomputation
    # (shape, e, seq); what a stage keeps once for all its layers, such as rotary tables or a
    # mask (shape, e, seq, layers recomputed); what the final norm keeps (shape, e).
    layer_activation_bytes: Callable[[ModelShape, int, int], float] = lambda s, e, seq: 0.0
    stage_activation_bytes: Callable[[ModelShape, int, int, bool], float] = no_stage_bytes
    final_norm_bytes: Callable[[ModelShape, int], float] = lambda shape, e: 0.0
    _compiled: list = field(default_factory=list, compare=False, repr=False)

    def _patterns(self) -> list[tuple[re.Pattern, KeyRule]]:
        if not self._compiled:
            for rule in self.rules:
                pattern = re.escape(rule.hf).replace(re.escape("{i}"), r"(\d+)")
                self._compiled.append((re.compile(f"^{pattern}$"), rule))
        return self._compiled

    def lookup_hf(self, hf_key: str) -> tuple[KeyRule, int | None] | None:
        """The rule and layer index for an HF key; None if the key is an ignored buffer.

        Raises UserError naming the key when it is neither mapped nor ignored.
        """
        for pattern, rule in self._patterns():
            m = pattern.match(hf_key)
            if m:
                return rule, (int(m.group(1)) if rule.part == "layer" else None)
        if any(re.search(p, hf_key) for p in self.ignored_hf):
            return None
        raise UserError(
            f"unknown {self.model_type} checkpoint key {hf_key!r}: not in the {self.name} key map "
            f"(wrong architecture, or a variant this converter does not support)"
        )

    def hf_key(self, part: str, our_key: str, layer: int | None = None) -> tuple[str, Transform]:
        """The HF key (and transform) for one of our keys; UserError naming it if unmapped."""
        for rule in self.rules:
            if rule.part == part and rule.ours == our_key:
                return rule.hf.replace("{i}", str(layer)), rule.transform
        raise UserError(f"unknown {self.name} {part} key {our_key!r}: not in the key map")

    def expected_keys(self, config: Any) -> dict[str, list[str]]:
        """Keys each part's file must hold for this config, from modules built on the meta
        device (so optional biases follow the config); the LM head weight is absent from the
        head when embeddings are tied. Every key must be in the key map."""
        import torch

        config = prepare_config(config, self)
        with torch.device("meta"):
            keys = {
                "embed": list(self.build_embedding(config).state_dict()),
                "layer": list(self.build_layer(config, 0).state_dict()),
                "head": list(self.build_head(config).state_dict()),
            }
        if is_tied(config):
            keys["head"].remove(self.lm_head_weight)
        for part, names in keys.items():
            for name in names:
                self.hf_key(part, name, 0)  # raises if the map lacks a key the module has
        return keys

    def expected_hf_keys(self, config: Any) -> list[str]:
        """Every HF key a complete checkpoint for this config holds."""
        out = []
        for part, names in self.expected_keys(config).items():
            layers = range(config.num_hidden_layers) if part == "layer" else [None]
            out += [self.hf_key(part, k, i)[0] for i in layers for k in names]
        return out


def is_tied(config: Any) -> bool:
    """Whether the LM head reuses the input embedding matrix."""
    return bool(getattr(config, "tie_word_embeddings", False))


def prepare_config(config: Any, arch: Architecture) -> Any:
    """A copy of an HF config with an attention implementation chosen (SDPA where transformers
    offers it, so a causal mask is never materialised; eager for GPT-J, which has no SDPA)."""
    import copy

    config = copy.deepcopy(config)
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = arch.attn_implementation
    return config
