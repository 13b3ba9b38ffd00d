"""The two stage modules every architecture builds the same way: the token embedding and the head.

Each architecture names its tensors as its HF checkpoint does (`embed_in`, `wte`, `embed_tokens`;
`final_layer_norm`, `ln_f`, `norm`), so the modules here register their children under the
names the architecture module gives; the keys in `embeddings.safetensors` / `head.safetensors`
are `<name>.weight` (see `openchatkit/models/arch.py` for the key maps).
"""

from __future__ import annotations

import torch
from torch import nn


class Embedding(nn.Module):
    """Token embedding, then dropout when the architecture has one: (B, S) -> (B, S, H)."""

    def __init__(
        self,
        name: str,
        vocab_size: int,
        hidden_size: int,
        *,
        dropout: float | None = None,
        dropout_name: str = "drop",
        padding_idx: int | None = None,
    ):
        super().__init__()
        self._embedding_name = name
        self.add_module(name, nn.Embedding(vocab_size, hidden_size, padding_idx))
        self._dropout_name = dropout_name if dropout is not None else None
        if dropout is not None:
            self.add_module(dropout_name, nn.Dropout(dropout))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = getattr(self, self._embedding_name)(input_ids)
        if self._dropout_name is None:
            return hidden
        return getattr(self, self._dropout_name)(hidden)


class Head(nn.Module):
    """Final norm and LM head: hidden (B, S, H) -> logits (B, S, V)."""

    def __init__(
        self, norm_name: str, norm: nn.Module, hidden_size: int, vocab_size: int, bias: bool
    ):
        super().__init__()
        self._norm_name = norm_name
        self.add_module(norm_name, norm)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=bias)

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm alone (the trainer fuses the LM head into its loss)."""
        return getattr(self, self._norm_name)(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.normalize(hidden))
