"""Perplexity of a causal LM on chat data, scored exactly as lm-eval's `loglikelihood_rolling`.

Each record is scored on its own. Its tokens (`tokenizer.encode(text)`, as lm-eval's HFLM encodes)
are cut into lm-eval's rolling windows of the model's context length: the first window is
conditioned on the prefix token (BOS, else EOS) and predicts every token; later windows predict
the next `max_length` tokens with as much earlier text as fits. Windows are batched by length
with right padding and no attention mask, as lm-eval does (causal attention makes the padding
invisible to the scored positions). The per-token log-probabilities are summed in float64.

Metrics (lm-eval's definitions): `word_perplexity = exp(-sum ll / words)` with words counted by
`re.split(r"\\s+", text)`, `byte_perplexity = exp(-sum ll / bytes)`,
`bits_per_byte = -sum ll / bytes / ln 2`; ours adds `token_perplexity = exp(-sum ll / tokens)`.

`loss_on="bot"` (ours, lm-eval has no such mode) scores only the bot turns: the same windows, but
only tokens that fall inside the trainer's learned spans (`openchatkit.data.rendering`) count, and
bytes and words are those of the spans.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from openchatkit.errors import UserError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither config nor tokenizer says


@dataclass
class ScoredText:
    """One record to score: the text and the character spans that count (None: all of it)."""

    text: str
    spans: list[tuple[int, int]] | None = None


def read_records(paths: Iterable[str | Path]) -> list[dict]:
    """Records of `.jsonl` files: OIG `text` or chat `messages`. A missing or empty file, or any
    malformed line, is a UserError naming the file and counting the bad lines."""
    from openchatkit.data.jsonl import Invalid, iter_json_lines
    from openchatkit.data.sources import parse_record

    records: list[dict] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"--data: file {path} does not exist")
        bad, first_bad, count = 0, None, 0
        try:
            # Bounded lines: a nested or over-long line is a malformed one, not a traceback.
            with open(path, "rb") as f:
                lines = list(iter_json_lines(f))
        except OSError as err:
            raise UserError(f"--data: cannot read {path}: {err}") from None
        for number, record in lines:
            parsed = record if isinstance(record, Invalid) else parse_record(record)
            if isinstance(parsed, str):
                bad += 1
                first_bad = first_bad or (number, parsed)
                continue
            count += 1
            records.append({"text": parsed.text, "messages": parsed.messages})
        if bad:
            line_no, why = first_bad
            raise UserError(
                f"--data: {path} has {bad} malformed line(s) (first: line {line_no}, {why}); "
                "each line must be a JSON object with `text` or `messages`"
            )
        if count == 0:
            raise UserError(f"--data: {path} holds no records")
    return records


def render_records(records: list[dict], tokenizer, loss_on: str = "all") -> list[ScoredText]:
    """OIG `text` as it stands; `messages` rendered as the trainer renders them."""
    from openchatkit.data.rendering import render_document
    from openchatkit.data.sources import Document

    out = []
    for r in records:
        messages = tuple(r["messages"]) if r.get("messages") else None
        text, spans = render_document(Document(r.get("text"), messages), tokenizer, loss_on)
        out.append(ScoredText(text, None if loss_on == "all" else spans))
    return out


def rolling_windows(
    tokens: list[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows: (context, continuation) pairs covering `tokens`."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(tokens, prefix_token, max_length, context_len=1)
    ]


def prefix_token_id(tokenizer) -> int:
    """lm-eval's HFLM prefix: BOS when the tokenizer has one, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def model_max_length(model, tokenizer) -> int:
    """The window length lm-eval's HFLM uses for this model and tokenizer."""
    from lm_eval.models.utils import resolve_max_length

    return int(resolve_max_length(model.config, tokenizer, default=DEFAULT_MAX_LENGTH))


def encode(tokenizer, text: str, prefix: int) -> list[int]:
    """HFLM.tok_encode: the tokenizer's defaults, without special tokens when the text already
    starts with the prefix token's text."""
    starts = text.startswith(tokenizer.decode(prefix))
    return tokenizer.encode(text, add_special_tokens=False) if starts else tokenizer.encode(text)


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


@torch.inference_mode()
def score_windows(
    model,
    windows: list[tuple[list[int], list[int]]],
    batch_size: int,
    device: str | torch.device,
    progress: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Per-token log-probabilities (float64, shape (len(continuation),)) of each window's
    continuation, batched longest first."""
    inputs = [(ctx + cont)[:-1] for ctx, cont in windows]
    order = sorted(range(len(windows)), key=lambda i: -len(inputs[i]))
    out: list[torch.Tensor | None] = [None] * len(windows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(inputs[batch[0]])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
        logits = model(ids.to(device)).logits  # (batch, width, vocab)
        for row, i in enumerate(batch):
            cont = windows[i][1]
            end = len(inputs[i])
            target = torch.tensor(cont, device=logits.device)
            # The continuation's rows in fp32 before the log-softmax: a GPU model's bf16 logits
            # (8-bit mantissa) would round each log-probability by up to ~0.4 % of its size,
            # and the CPU figures the tests check are fp32. Row by row: no fp32 copy of the
            # whole (batch, width, vocab) block.
            rows = torch.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)
            picked = rows.gather(-1, target[:, None])[:, 0]
            out[i] = picked.double().cpu()
        if progress:
            progress(len(batch))
    return out  # type: ignore[return-value]


def token_char_spans(tokenizer, text: str, tokens: list[int]) -> list[tuple[int, int]] | None:
    """Character span of each token of `tokens` in `text`, from the tokenizer's offsets; None
    when the tokenizer gives none or they do not line up with `tokens`."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    extra = len(tokens) - len(ids)  # special tokens the default encoding added in front
    if extra < 0 or tokens[extra:] != ids:
        return None
    return [(0, 0)] * extra + [tuple(o) for o in offsets]


@dataclass
class PerplexityResult:
    loglikelihood: float  # summed over every record, natural log
    tokens: int
    bytes: int
    words: int
    records: int
    per_record: list[float]  # summed log-likelihood of each record

    def metrics(self) -> dict:
        ll = self.loglikelihood
        return {
            "token_perplexity": math.exp(-ll / self.tokens),
            "bits_per_byte": -ll / self.bytes / math.log(2),
            "byte_perplexity": math.exp(-ll / self.bytes),
            "word_perplexity": math.exp(-ll / self.words),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "n": self.records,
        }


def perplexity(
    model,
    tokenizer,
    texts: list[ScoredText],
    batch_size: int = 1,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Score `texts` one by one as lm-eval's `loglikelihood_rolling` does (see module doc)."""
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    max_length = max_length or model_max_length(model, tokenizer)
    prefix = prefix_token_id(tokenizer)
    windows, owners, encoded = [], [], []
    for index, item in enumerate(texts):
        tokens = encode(tokenizer, item.text, prefix)
        if not tokens:
            raise UserError(f"--data: record {index + 1} tokenizes to nothing")
        encoded.append(tokens)
        for window in rolling_windows(tokens, prefix, max_length):
            windows.append(window)
            owners.append(index)
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    scores = score_windows(model, windows, batch_size, device, bar.update)
    bar.close()

    # Each record's per-token log-probs in order (windows of a record are consecutive).
    per_token: list[list[torch.Tensor]] = [[] for _ in texts]
    for owner, score in zip(owners, scores, strict=True):
        per_token[owner].append(score)
    total_ll, total_tokens, total_bytes, total_words, per_record = 0.0, 0, 0, 0, []
    for item, tokens, parts in zip(texts, encoded, per_token, strict=True):
        lls = torch.cat(parts)
        if item.spans is None:
            ll, n_tok = float(lls.sum()), len(tokens)
            n_bytes, n_words = count_bytes(item.text), count_words(item.text)
        else:
            mask = _span_mask(tokenizer, item, tokens)
            ll, n_tok = float(lls[mask].sum()), int(mask.sum())
            pieces = [item.text[a:b] for a, b in item.spans]
            n_bytes = sum(count_bytes(p) for p in pieces)
            n_words = sum(count_words(p.strip()) for p in pieces if p.strip())
        per_record.append(ll)
        total_ll += ll
        total_tokens, total_bytes, total_words = (
            total_tokens + n_tok,
            total_bytes + n_bytes,
            total_words + n_words,
        )
    if total_tokens == 0:
        raise UserError("--loss-on bot: the data has no bot turns to score")
    return PerplexityResult(
        total_ll, total_tokens, total_bytes, total_words, len(texts), per_record
    )


def _span_mask(tokenizer, item: ScoredText, tokens: list[int]) -> torch.Tensor:
    """True for the tokens whose characters start inside one of `item.spans`."""
    offsets = token_char_spans(tokenizer, item.text, tokens)
    if offsets is None:
        raise UserError("--loss-on bot needs a fast tokenizer (character offsets)")
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    for i, (a, b) in enumerate(offsets):
        if b > a and any(s <= a < e for s, e in item.spans):
            mask[i] = True
    return mask
