"""The model's shape: the one object that says how big a model is, read from its config.json.

`ModelShape.from_dict(cfg)` asks the model's architecture (`openchatkit/models/registry.py`) how
its config names the sizes (GPT-J's `n_embd` is everyone else's `hidden_size`), what it ties by
default and how many parameters its layers hold; the trainer's config, the memory planner and the
benchmarks all read this one object. `split_layers` is the one even split of layers into
pipeline stages. Nothing here imports torch or transformers, so a script can use it to refuse
bad input within a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openchatkit.errors import UserError

if TYPE_CHECKING:
    from openchatkit.models.arch import Architecture


@dataclass(frozen=True)
class ModelShape:
    """A causal LM's sizes under our names (see the module docstring)."""

    model_type: str  # HF config.model_type
    num_layers: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    heads: int
    kv_heads: int  # < heads under grouped-query attention
    head_dim: int
    intermediate_size: int  # MLP width
    rotary_dim: int  # rotated dimensions per head
    hidden_act: str  # the MLP's activation, as HF names it (gelu, gelu_fast, silu, ...)
    sliding_window: int | None = None  # attention span in tokens; None: the whole row

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: str = "the model") -> ModelShape:
        """From a config.json mapping (or `PretrainedConfig.to_dict()`); `where` names it in
        errors. Sizes the architecture cannot find are a UserError."""
        from openchatkit.models.registry import get_architecture, supported_model_types

        model_type = cfg.get("model_type")
        if model_type not in supported_model_types():
            raise UserError(
                f"{where}: model_type {model_type!r} is not one of "
                f"{', '.join(supported_model_types())}"
            )
        arch = get_architecture(model_type)
        try:
            sizes = arch.read_sizes(cfg)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}: config.json lacks a usable size ({err!r})") from None
        return cls(
            model_type=model_type,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch.default_tied)),
            **sizes,
        )

    @property
    def arch(self) -> Architecture:
        from openchatkit.models.registry import get_architecture

        return get_architecture(self.model_type)

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one layer, by module name."""
        return self.arch.layer_linears(self)

    def layer_params(self) -> int:
        """Parameters of one transformer layer."""
        return sum(a * b for a, b in self.linear_shapes().values()) + sum(self.layer_vectors())

    def layer_vectors(self) -> list[int]:
        """Sizes of one layer's one-dimensional parameters (norm weights, biases)."""
        return self.arch.layer_vectors(self)

    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm, LM head weight (counted even when tied) and any LM head bias."""
        return self.vocab_size * self.hidden_size + sum(self.arch.head_vectors(self))


def standard_sizes(cfg: dict[str, Any]) -> dict[str, Any]:
    """The sizes of a config that uses transformers' usual names (Llama, Qwen2, Mistral, ...):
    every head's dimensions rotate; `head_dim` defaults to hidden / heads."""
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return dict(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        vocab_size=int(cfg["vocab_size"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]),
        rotary_dim=head_dim,
        hidden_act=str(cfg.get("hidden_act") or "silu"),
        sliding_window=None,
    )


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Split `num_layers` layers into `num_stages` contiguous ranges, as even as possible
    (the first `num_layers % num_stages` stages get one layer more).

    >>> split_layers(5, 2)
    [range(0, 3), range(3, 5)]
    """
    if not isinstance(num_layers, int) or not isinstance(num_stages, int):
        raise ValueError("num_layers and num_stages must be integers")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges
