"""Chat rendering: a Document as one string plus the character spans the loss is taken on.

OIG text marks turns with `<human>:` and `<bot>:`. With `loss_on="bot"` the learned spans are the
bot answers: from just after each `<bot>:` up to and including the next `<human>:` marker (that
marker is what the bot emits to end its turn; inference stops on it), or to the end of the text,
in which case the EOS appended after the document is learned as well. Human turns and any text
before the first marker are masked. A text without any turn marker is plain text, learned whole.

Chat-template data (`messages`) is rendered with the tokenizer's chat template; each assistant
turn is learned, from the end of the template's generation prompt up to the end of the turn.
"""

from __future__ import annotations

import re

from openchatkit.conversation import BOT_PREFIX as BOT
from openchatkit.conversation import HUMAN_PREFIX as HUMAN
from openchatkit.data.sources import Document
from openchatkit.errors import UserError

LOSS_MODES = ("all", "bot")
_MARKER = re.compile(re.escape(HUMAN) + "|" + re.escape(BOT))

# (start, end) character ranges of a string, end exclusive.
Spans = list[tuple[int, int]]


def bot_spans(text: str) -> Spans:
    """The learned character spans of an OIG text under `loss_on="bot"` (see module docstring)."""
    markers = [(m.start(), m.group()) for m in _MARKER.finditer(text)]
    if not markers:
        return [(0, len(text))]
    spans: Spans = []
    for i, (start, marker) in enumerate(markers):
        if marker != BOT:
            continue
        begin = start + len(BOT)
        if i + 1 == len(markers):
            end = len(text)
        else:
            nxt, nxt_marker = markers[i + 1]
            end = nxt + len(HUMAN) if nxt_marker == HUMAN else nxt
        if end > begin:
            spans.append((begin, end))
    return spans


def render_messages(messages: tuple[dict, ...], tokenizer, loss_on: str) -> tuple[str, Spans]:
    """Render chat messages with the tokenizer's template; spans of the assistant turns
    (all of the text when `loss_on="all"`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "data has a `messages` field but the tokenizer has no chat template; "
            "use OIG `text` records or a model whose tokenizer defines one"
        )
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if loss_on == "all":
        return full, [(0, len(full))]
    spans: Spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # Render the conversation up to this turn twice: with the generation prompt (what the
        # model is given) and with the answer (what it must produce). The difference is the
        # answer plus its end-of-turn token(s).
        prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if upto.startswith(prompt) and full.startswith(upto):
            spans.append((len(prompt), len(upto)))
        else:  # a template that rewrites earlier turns: fall back to the answer text itself
            at = full.find(m["content"], spans[-1][1] if spans else 0)
            if at >= 0:
                spans.append((at, at + len(m["content"])))
    return full, spans


def render_document(doc: Document, tokenizer, loss_on: str) -> tuple[str, Spans]:
    """(text to tokenize, learned character spans) of one document."""
    if doc.messages is not None:
        return render_messages(doc.messages, tokenizer, loss_on)
    text = doc.text or ""
    if loss_on == "all":
        return text, [(0, len(text))]
    if doc.spans is not None:  # a moderation window: its labels are the answers
        return text, list(doc.spans)
    return text, bot_spans(text)
