"""Pipeline stages: a contiguous range of transformer layers, plus the embedding on the first stage
and the final norm + LM head on the last, loaded from and saved to the layer-sharded format.

`activation_checkpointing = "layers"` wraps each layer in non-reentrant
`torch.utils.checkpoint` while training: a layer keeps only its input and recomputes the rest
in its backward (same RNG state, so the same dropout masks; same losses and gradients).

Parameter names do not depend on the layout: `embed.*`, `layers.<global index>.*`, `head.*`, and
the keys inside `embeddings.safetensors` / `layer_XXXXX.safetensors` / `head.safetensors` are
those names minus the prefix, so a stage's state_dict maps 1:1 onto its files. Chaining the stages
of any split gives the logits of HF `AutoModelForCausalLM` for the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from openchatkit.errors import UserError
from openchatkit.models import sharded
from openchatkit.models.arch import is_tied, prepare_config
from openchatkit.models.registry import get_architecture
from openchatkit.models.shape import split_layers

__all__ = ["StageModel", "save_stage", "split_layers"]


class StageModel(nn.Module):
    """One pipeline stage of a causal LM of any registered architecture.

    `forward(x, position_ids=None)`: the first stage takes input_ids (B, S), the others hidden
    states (B, S, H); returns hidden (B, S, H), or logits (B, S, V) on the last stage. Attention
    is causal over the whole row (packed data, no padding). No loss inside.

    Tied embeddings: on a single stage the LM head uses the embedding Parameter itself. Across
    several stages the last stage holds its own copy `head.lm_head.weight` (initialised from the
    embedding); then `tied_embed_param` (first stage) and `tied_head_param` (last stage) name the
    two copies so the trainer can sum their gradients. Both are None when there is nothing to sync.
    """

    def __init__(
        self,
        config: Any,
        layer_range: range,
        is_first: bool,
        is_last: bool,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        init_weights: bool = True,
    ):
        super().__init__()
        self.arch = get_architecture(config.model_type)
        self.config = prepare_config(config, self.arch)
        num_layers = self.config.num_hidden_layers
        if layer_range.step != 1 or layer_range.start < 0 or layer_range.stop > num_layers:
            raise ValueError(f"layer_range {layer_range} is not a slice of {num_layers} layers")
        self.layer_range = layer_range
        self.is_first, self.is_last = bool(is_first), bool(is_last)
        self.tie_word_embeddings = is_tied(self.config)
        self.source_folder: Path | None = None  # set by from_sharded; tokenizer files live there
        device = torch.device(device) if device is not None else torch.device("cpu")

        # Built in fp32 and cast after init, so a random init draws the same numbers whatever
        # the dtype; with device="meta" nothing is allocated (from_sharded assigns loaded tensors).
        with torch.device(device):
            self.embed = self.arch.build_embedding(self.config) if self.is_first else None
            self.layers = nn.ModuleDict(
                {str(i): self.arch.build_layer(self.config, i) for i in layer_range}
            )
            self.head = self.arch.build_head(self.config) if self.is_last else None
        self.rotary = None
        self.activation_checkpointing = "none"  # or "layers", see the module docstring
        # Last stage only: return the hidden state; the head runs inside the trainer's loss
        # (openchatkit/training/loss.py), so GPipe keeps no logits per micro-batch.
        self.head_in_loss = False
        if device.type != "meta":
            self._materialize_buffers(device)
            if init_weights:
                self.init_weights()
            if dtype is not None:
                self._cast_params(dtype)
        self._tie()

    def set_activation_checkpointing(self, mode: str) -> None:
        """ "none" or "layers" (see the module docstring)."""
        if mode not in ("none", "layers"):
            raise ValueError(f"activation checkpointing {mode!r}: expected none or layers")
        self.activation_checkpointing = mode

    # -- names the trainer uses -------------------------------------------------------------
    @property
    def tied_embed_param(self) -> str | None:
        """Name of the embedding copy whose gradient must be summed with the head's copy."""
        if self.tie_word_embeddings and self.is_first and not self.is_last:
            return f"embed.{self.arch.embed_weight}"
        return None

    @property
    def tied_head_param(self) -> str | None:
        """Name of the LM head copy of the tied embedding on a last stage that is not first."""
        if self.tie_word_embeddings and self.is_last and not self.is_first:
            return f"head.{self.arch.lm_head_weight}"
        return None

    @property
    def tied_copy_names(self) -> tuple[str, str] | None:
        """(embedding name, LM head copy name) of a tied embedding split over several stages,
        the same on every stage of the pipeline (each holds at most one of the two); None when
        nothing is tied or one stage holds both."""
        if not self.tie_word_embeddings or (self.is_first and self.is_last):
            return None
        return f"embed.{self.arch.embed_weight}", f"head.{self.arch.lm_head_weight}"

    def _shares_tied_weight(self) -> bool:
        return self.tie_word_embeddings and self.is_first and self.is_last

    def _tie(self) -> None:
        if self._shares_tied_weight():
            self.head.lm_head.weight = self.embed.get_submodule(
                self.arch.embed_weight.rsplit(".", 1)[0]
            ).weight

    def _materialize_buffers(self, device: torch.device) -> None:
        # Rotary tables are non-persistent buffers computed from the config, in fp32 like HF.
        self.rotary = self.arch.build_rotary(self.config)
        if self.rotary is not None:
            self.rotary.to(device)
        for layer in self.layers.values():
            self.arch.materialize_buffers(layer, device)

    def _cast_params(self, dtype: torch.dtype) -> None:
        for module in [self.embed, *self.layers.values(), self.head]:
            if module is not None:
                for param in module.parameters(recurse=True):
                    param.data = param.data.to(dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as HF's `_init_weights`: normal(0, initializer_range) for linear and
        embedding weights, zero biases, unit norms."""
        std = getattr(self.config, "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif type(module).__name__.endswith("RMSNorm"):
                module.weight.fill_(1.0)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(x) if self.is_first else x  # (B, S, H)
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        # Causal over the whole row: packed rows attend across documents, as the trainer's data
        # expects (None under SDPA without a sliding window: its is_causal path).
        mask = self.arch.causal_mask(self.config, hidden)
        position_embeddings = self.rotary(hidden, position_ids) if self.rotary else None
        recompute = (
            self.activation_checkpointing == "layers" and self.training and torch.is_grad_enabled()
        )
        for layer in self.layers.values():
            args = (layer, hidden, mask, position_ids, position_embeddings)
            if recompute:
                hidden = checkpoint(self.arch.forward_layer, *args, use_reentrant=False)
            else:
                hidden = self.arch.forward_layer(*args)
        return self.head(hidden) if self.is_last and not self.head_in_loss else hidden

    # -- loading and saving -----------------------------------------------------------------
    @classmethod
    def from_sharded(
        cls,
        folder: str | os.PathLike,
        layer_range: range,
        is_first: bool,
        is_last: bool,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
    ) -> StageModel:
        """Build a stage from a layer-sharded folder, reading only this stage's files (and, for
        a last stage with tied embeddings, the embedding tensor it copies)."""
        from transformers import AutoConfig

        folder = Path(folder)
        manifest = sharded.read_manifest(folder)
        config = AutoConfig.from_pretrained(folder)
        if config.num_hidden_layers != manifest.num_layers:
            raise UserError(
                f"{folder}: config.json has {config.num_hidden_layers} layers, "
                f"manifest.json {manifest.num_layers}"
            )
        if is_tied(config) != manifest.tie_word_embeddings:
            raise UserError(f"{folder}: config.json and manifest.json disagree on tied embeddings")
        dtype = sharded.parse_dtype(dtype) or sharded.parse_dtype(manifest.dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")
        stage = cls(config, layer_range, is_first, is_last, device="meta", init_weights=False)
        arch = stage.arch
        expected = arch.expected_keys(stage.config)

        def load(name: str, part: str, keys: list[str] | None = None) -> dict:
            tensors = sharded.load_tensors(folder / name, keys, dtype=dtype, device=device)
            wanted = keys if keys is not None else expected[part]
            missing = [k for k in wanted if k not in tensors]
            unknown = [k for k in tensors if k not in wanted]
            if missing or unknown:
                what = f"lacks {missing[0]!r}" if missing else f"has unknown tensor {unknown[0]!r}"
                raise UserError(f"{folder / name} {what}")
            return tensors

        state = {}
        if is_first:
            state.update(
                {f"embed.{k}": v for k, v in load(sharded.EMBEDDINGS_FILE, "embed").items()}
            )
        for i in layer_range:
            state.update(
                {f"layers.{i}.{k}": v for k, v in load(sharded.layer_file(i), "layer").items()}
            )
        if is_last:
            state.update({f"head.{k}": v for k, v in load(sharded.HEAD_FILE, "head").items()})
            if stage.tie_word_embeddings and not is_first:
                # This stage's own copy of the tied matrix (see the class docstring).
                emb = load(sharded.EMBEDDINGS_FILE, "embed", [arch.embed_weight])
                state[f"head.{arch.lm_head_weight}"] = emb[arch.embed_weight]
        # The shared tied weight arrives once, under its embedding name.
        result = stage.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in result.missing_keys if not stage._is_shared_head_key(k)]
        if missing or result.unexpected_keys:
            raise UserError(f"{folder}: stage weights do not match the config: {missing[:3]}")
        stage._tie()
        stage._materialize_buffers(device)
        stage.source_folder = folder
        return stage

    def _is_shared_head_key(self, key: str) -> bool:
        return self._shares_tied_weight() and key == f"head.{self.arch.lm_head_weight}"

    def part_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """This stage's tensors grouped by file name (the tied LM head copy is never written:
        the embedding is the one stored copy)."""
        out = {}
        if self.is_first:
            out[sharded.EMBEDDINGS_FILE] = self.embed.state_dict()
        for i, layer in self.layers.items():
            out[sharded.layer_file(int(i))] = layer.state_dict()
        if self.is_last:
            head = self.head.state_dict()
            if self.tie_word_embeddings:
                head.pop(self.arch.lm_head_weight)
            out[sharded.HEAD_FILE] = head
        return out


def save_stage(
    stage: StageModel,
    folder: str | os.PathLike,
    write_metadata: bool | None = None,
    chat_format: str | None = None,
    tokenizer_from: str | os.PathLike | None = None,
) -> list[str]:
    """Write this stage's own files into `folder`, each atomically (temp name, then rename).

    With `write_metadata` (default: on the first stage) also config.json, manifest.json and the
    tokenizer files (from `tokenizer_from`, else the folder the stage was loaded from). Returns
    the names written. The caller makes the folder as a whole appear atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    dtype = None
    for name, tensors in stage.part_state_dicts().items():
        sharded.save_tensors(folder / name, tensors)
        written.append(name)
        dtype = dtype or next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    if write_metadata is None:
        write_metadata = stage.is_first
    if write_metadata:
        config = stage.config
        dtype = dtype or torch.float32
        config.dtype = dtype
        config.save_pretrained(folder)
        written.append("config.json")
        src = tokenizer_from or stage.source_folder
        if src is not None:
            written += sharded.copy_tokenizer_files(src, folder)
        extra = {}
        if stage.source_folder is not None:
            source = sharded.read_manifest(stage.source_folder)
            extra = source.extra  # e.g. the original model's name
            chat_format = chat_format or source.chat_format
        manifest = sharded.Manifest(
            architecture=stage.arch.name,
            num_layers=config.num_hidden_layers,
            dtype=sharded.dtype_name(dtype),
            tie_word_embeddings=stage.tie_word_embeddings,
            chat_format=chat_format,
            extra=extra,
        )
        sharded.write_manifest(folder, manifest)
        written.append(sharded.MANIFEST)
    return written
