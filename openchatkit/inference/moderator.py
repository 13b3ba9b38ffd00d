"""The moderation classifier: a causal LM scoring the five labels in the format of
`openchatkit.moderation`.

Classification never generates: it scores the log-likelihood of each label string (with its
leading space) after `Output:`, summed over the label's tokens, and normalises the five with a
softmax. The answer is always one of the five labels with a probability, deterministically.

Speed: the header and few-shot examples are the same for every input, so their KV cache is
computed once and copied for each batch. A batch then takes two forward passes: its `batch_size`
queries (right-padded, pads masked) on the prefix cache, and the 5 labels of every query on a
copy of that cache repeated 5 times, so each query's tokens are computed once, not five times.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.moderation import (  # Classification: the result type of both kinds
    DEFAULT_EXAMPLES,
    HEADER,
    INTERVENTION_THRESHOLD,
    LABELS,
    Classification,
    format_example,
    read_examples,
)


class Moderator:
    """Classify texts with a causal LM in the GPT-JT-Moderation format (see module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        examples: Sequence[tuple[str, str]] | None = None,
        device: str | None = None,
        batch_size: int = 8,
        context_window: int | None = None,
        name: str = "",
    ) -> None:
        import torch

        self.model, self.tokenizer = model, tokenizer
        self.examples = tuple(DEFAULT_EXAMPLES if examples is None else examples)
        self.device = torch.device(device or next(model.parameters()).device)
        self.batch_size = max(1, int(batch_size))
        self.name = name
        # The bot's refusal rule for this kind: refuse when p(needs intervention) >= threshold
        # (an encoder moderation model carries its own, tuned when it was trained).
        self.threshold = INTERVENTION_THRESHOLD
        config = getattr(model, "config", None)
        self.context_window = int(
            context_window
            or getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 2048
        )
        # The shared prefix: header + few-shot examples; the query starts with "\n\n".
        prefix = HEADER + "".join("\n\n" + format_example(t, lab) for t, lab in self.examples)
        self.prefix_ids = self._encode(prefix, special=True, what="the prompt")
        self.label_ids = [self._encode(" " + label, what=f"label {label!r}") for label in LABELS]
        self.query_tail = self._encode("\nOutput:", what="the prompt")
        if len(self.prefix_ids) + max(map(len, self.label_ids)) + 16 > self.context_window:
            raise UserError(
                f"the moderation prompt ({len(self.prefix_ids)} tokens with its few-shot "
                f"examples) does not fit the model's {self.context_window}-token window: "
                "use fewer or shorter examples"
            )
        self.pad_id = int(tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
        self._prefix_cache = None  # KV cache of prefix_ids, batch 1 (None until first use)
        self.use_prefix_cache = True

    def _encode(self, text: str, special: bool = False, what: str = "text") -> list[int]:
        """Token ids of `text`; UserError when the tokenizer cannot represent it."""
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if not ids or (unk is not None and unk in ids):
            raise UserError(
                f"the moderation model's tokenizer cannot encode {what} "
                f"(unknown tokens in {text[:40]!r}); use a model with a general-purpose tokenizer"
            )
        return ids

    # ---- scoring -----------------------------------------------------------------------
    def _query_ids(self, text: str) -> list[int]:
        """`\\n\\nInput: text\\nOutput:` as ids, the text cut (keeping its start) to fit the window."""
        if not text or not text.strip():
            raise UserError("nothing to classify: the text is empty")
        head = self.tokenizer("\n\nInput: " + text, add_special_tokens=False)["input_ids"]
        budget = (
            self.context_window
            - len(self.prefix_ids)
            - len(self.query_tail)
            - max(map(len, self.label_ids))
        )
        return head[:budget] + self.query_tail

    def _prefix_kv(self):
        import torch

        if self._prefix_cache is None:
            ids = torch.tensor([self.prefix_ids], device=self.device)
            self._prefix_cache = self.model(input_ids=ids, use_cache=True).past_key_values
        return self._prefix_cache

    def log_likelihoods(self, texts: Sequence[str]):
        """(len(texts), 5) float32 tensor: summed log-probability of each label after each text."""
        import torch

        queries = [self._query_ids(t) for t in texts]  # validates every text before any work
        out = []
        with torch.inference_mode():
            for start in range(0, len(queries), self.batch_size):
                out.append(self._score(queries[start : start + self.batch_size]))
        return torch.cat(out) if out else torch.zeros(0, len(LABELS))

    def _score(self, queries: list[list[int]]):
        """(len(queries), 5) summed label log-probabilities of one batch."""
        import torch

        n_lab = len(self.label_ids)
        width_l = max(map(len, self.label_ids))
        first = None
        if self.use_prefix_cache:
            try:
                first, later = self._cached_hidden(queries)
            except (AttributeError, TypeError, NotImplementedError):
                # A model whose cache cannot be copied and repeated (not a transformers Cache):
                # score without it from now on (slower, same numbers).
                self.use_prefix_cache = False
        if first is None:
            first, later = self._full_hidden(queries)
        # Row r = (query i, label j), i-major. The state predicting label token 0 is the query's
        # last one; token k >= 1 is predicted by the state of label token k - 1.
        states = torch.cat([first.repeat_interleave(n_lab, 0), later[:, : width_l - 1]], dim=1)
        target = torch.zeros(len(queries) * n_lab, width_l, dtype=torch.long)
        valid = torch.zeros(len(queries) * n_lab, width_l, dtype=torch.bool)
        for r in range(len(queries) * n_lab):
            lab = self.label_ids[r % n_lab]
            target[r, : len(lab)] = torch.tensor(lab)
            valid[r, : len(lab)] = True
        logits = self._head(states).float()  # (rows, width_l, vocab): label positions only
        target, valid = target.to(logits.device), valid.to(logits.device)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
        return (logp * valid).sum(-1).view(len(queries), n_lab).cpu()

    def _cached_hidden(self, queries: list[list[int]]):
        """Two passes over the cached prefix: the queries (batch B), then the labels (5B rows)
        on a copy of the prefix+query cache, so each query's tokens are computed once.
        Returns (B, 1, H) states at each query's last token and (5B, Lmax, H) label states."""
        import torch

        dev, n_lab, p = self.device, len(self.label_ids), len(self.prefix_ids)
        lengths = torch.tensor([len(q) for q in queries])
        width_q = int(lengths.max())
        ids = torch.full((len(queries), width_q), self.pad_id, dtype=torch.long)
        for i, q in enumerate(queries):
            ids[i, : len(q)] = torch.tensor(q)
        q_mask = (torch.arange(width_q)[None] < lengths[:, None]).long()  # (B, Lq), pads 0
        past = copy.deepcopy(self._prefix_kv())
        past.batch_repeat_interleave(len(queries))
        mask = torch.cat([torch.ones(len(queries), p, dtype=torch.long), q_mask], dim=1)
        pos = p + torch.arange(width_q).expand(len(queries), -1)
        hidden = self._hidden(ids.to(dev), past, mask.to(dev), pos.to(dev))  # (B, Lq, H)
        first = hidden[torch.arange(len(queries)), (lengths - 1).to(dev)][:, None]
        # Labels: every query's cache row repeated 5 times; query pads stay masked out.
        past.batch_repeat_interleave(n_lab)
        width_l = max(map(len, self.label_ids))
        lab_ids = torch.full((len(queries) * n_lab, width_l), self.pad_id, dtype=torch.long)
        for r in range(len(queries) * n_lab):
            lab = self.label_ids[r % n_lab]
            lab_ids[r, : len(lab)] = torch.tensor(lab)
        mask = torch.cat(
            [mask.repeat_interleave(n_lab, 0), torch.ones(len(lab_ids), width_l, dtype=torch.long)],
            dim=1,
        )
        pos = p + lengths.repeat_interleave(n_lab)[:, None] + torch.arange(width_l)[None]
        later = self._hidden(lab_ids.to(dev), past, mask.to(dev), pos.to(dev))
        return first, later

    def _full_hidden(self, queries: list[list[int]]):
        """Reference path without any cache: one row prefix + query + label per (query, label),
        right-padded (real tokens never attend to the pads after them, so no mask)."""
        import torch

        n_lab, p = len(self.label_ids), len(self.prefix_ids)
        rows = [self.prefix_ids + q + lab for q in queries for lab in self.label_ids]
        ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        hidden = self._hidden(ids.to(self.device), None, None, None)
        width_l = max(map(len, self.label_ids))
        starts = [p + len(q) for q in queries for _ in range(n_lab)]  # first label position
        first = torch.stack([hidden[i * n_lab, starts[i * n_lab] - 1] for i in range(len(queries))])
        index = torch.tensor(starts)[:, None] + torch.arange(width_l)[None]
        index = index.clamp(max=hidden.shape[1] - 1).to(hidden.device)
        later = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        return first[:, None], later

    def _hidden(self, ids, past, mask, positions):
        """Last hidden states of the backbone (the LM head is applied to a few positions only)."""
        backbone = getattr(self.model, "base_model", None)
        target = self.model if backbone is None or backbone is self.model else backbone
        out = target(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=past is not None,
        )
        return out.logits if target is self.model else out.last_hidden_state

    def _head(self, hidden):
        backbone = getattr(self.model, "base_model", None)
        if backbone is None or backbone is self.model:
            return hidden  # _hidden already returned logits
        return self.model.get_output_embeddings()(hidden)

    # ---- public API ----------------------------------------------------------------------
    def classify_many(self, texts: Sequence[str]) -> list[Classification]:
        """Classify many texts, `batch_size` texts (x 5 labels) per forward pass."""
        import torch

        scores = self.log_likelihoods(texts)
        probs = torch.softmax(scores.double(), dim=-1)
        return [Classification.from_row(row) for row in probs.tolist()]

    def classify(self, text: str) -> tuple[str, dict[str, float]]:
        """(most likely label, {label: probability}) for one text."""
        result = self.classify_many([text])[0]
        return result.label, result.probabilities


def load_moderator(
    name: str | None,
    device: str = "auto",
    dtype: str = "auto",
    gpu_id: int = 0,
    examples: str | Path | None = None,
    batch_size: int = 8,
    loaded=None,
):
    """A moderator on MODEL, of either kind, with the same API (`classify_many`, `classify`,
    `name`, `threshold`):

    - a folder written by `training/train_moderation_classifier.py` (it holds
      `moderation_classifier.json`): an `EncoderModerator`, a sentence encoder with a
      classification head (`openchatkit.inference.encoder_moderator`);
    - otherwise a causal LM `Moderator`: an HF folder, hub id, the embedded model, or a trainer
      checkpoint / layer-sharded folder (converted in memory, `openchatkit.models.any_model`).
      `loaded` reuses an already loaded `LoadedModel` (the bot's chat model as its own
      moderator).
    """
    from openchatkit.inference.encoder_moderator import (
        is_encoder_moderator,
        load_encoder_moderator,
    )

    if is_encoder_moderator(name):
        if examples is not None:
            raise UserError(
                f"{name} is an encoder moderation model (a classification head, no few-shot "
                "prompt): few-shot examples apply to causal LM moderators only"
            )
        return load_encoder_moderator(name, device=device, gpu_id=gpu_id, batch_size=batch_size)
    from openchatkit.models.any_model import load_any_model

    shots = read_examples(examples) if examples is not None else None
    if loaded is None:
        loaded = load_any_model(name, device=device, dtype=dtype, gpu_id=gpu_id)
    return Moderator(
        loaded.model,
        loaded.tokenizer,
        shots,
        loaded.device,
        batch_size,
        loaded.context_window,
        loaded.name,
    )
