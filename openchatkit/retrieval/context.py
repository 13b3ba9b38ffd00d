"""The retrieved-context block put in front of the model, within a token budget.

`format_context` renders hits, best first, between two delimiter lines; a passage that does not
fit whole is cut at a word boundary, and passages after the budget is spent are left out, so the
block never exceeds `max_tokens` tokens of the chat model's tokenizer. `CONTEXT_INSTRUCTION`
is the sentence telling the model to answer from that block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONTEXT_BEGIN = "<context>"
CONTEXT_END = "</context>"
CONTEXT_INSTRUCTION = (
    "Answer the question using the information in the <context> block above; "
    "if it does not contain the answer, say so."
)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of `text` without special tokens (BOS/EOS are counted by the prompt, not here)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def _passage_header(number: int, hit: Any) -> str:
    title = getattr(hit, "title", "") or "untitled"
    source = getattr(hit, "source", "")
    return f"[{number}] {title}" + (f" ({source})" if source else "")


def _truncate(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` ending at a word boundary within `max_tokens` tokens."""
    if max_tokens <= 0:
        return ""
    if count_tokens(tokenizer, text) <= max_tokens:
        return text
    words = text.split()
    lo, hi = 0, len(words)  # binary search on the number of words that fit, with an ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(tokenizer, " ".join(words[:mid]) + " …") <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) + " …" if lo else ""


def format_context(hits: Sequence[Any], tokenizer: Any, max_tokens: int) -> str:
    """The delimited context block for `hits` (objects with text/title/source) in <= max_tokens.

    Shape:
        <context>
        [1] Title (source)
        passage text …

        [2] …
        </context>
    Returns "" when there are no hits or not even the delimiters and one header fit.
    """
    if not hits or max_tokens <= 0:
        return ""
    blocks: list[str] = []

    def render(parts: list[str]) -> str:
        return "\n".join([CONTEXT_BEGIN, "\n\n".join(parts), CONTEXT_END])

    for number, hit in enumerate(hits, start=1):
        header = _passage_header(number, hit)
        candidate = render([*blocks, f"{header}\n{hit.text}"])
        used = count_tokens(tokenizer, candidate)
        if used <= max_tokens:
            blocks.append(f"{header}\n{hit.text}")
            continue
        # Cut this passage to what is left; tokens do not add exactly across joins, so shrink
        # until the whole block is measured within budget.
        room = max_tokens - count_tokens(tokenizer, render([*blocks, f"{header}\n"]))
        while room > 0:
            text = _truncate(tokenizer, hit.text, room)
            if not text:
                break
            block = render([*blocks, f"{header}\n{text}"])
            if count_tokens(tokenizer, block) <= max_tokens:
                blocks.append(f"{header}\n{text}")
                break
            room -= 1
        break
    return render(blocks) if blocks else ""
