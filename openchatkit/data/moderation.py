"""The moderation packer: labelled records -> training windows in the GPT-JT-Moderation format.

Chosen per task with a format suffix, `--task-name data/moderation-sample/train.jsonl:moderation`
(see `openchatkit.data.tasks`), never by the file's name as the original did. As in the original's
packer (OpenChatKit `training/tasks/data_loaders/prosocial.py`), each window starts with the label
header and takes blank-line-separated examples until the next one would pass `--seq-length`:

    Possible labels:
    1. casual
    ...
    5. probably needs caution

    Input: <text>
    Output: <label>

    Input: ...

Differences, on purpose: the example that does not fit starts the next window (the original cut it
and lost its label), and the window is closed by EOS and padded with unlearned EOS, so every
window starts with the header (when only moderation tasks are mixed). `--loss-on bot` learns only
the label after each `Output:` (and the EOS); `--loss-on all` learns everything, as the original.

Records: `{"text", "label"}` (the bundled sample), `labels` instead of `label` (OIG-moderation's
tag strings such as `needs caution | hate`; the first of the five base labels is kept), or a
`text` already in the `Input: ...\\nOutput: label` form (see `openchatkit.moderation.parse_labelled`).
"""

from __future__ import annotations

from openchatkit.data.sources import Document, FileSource, HubSource
from openchatkit.data.tasks import TaskEntry
from openchatkit.moderation import HEADER, format_example, parse_labelled

_OUTPUT = "\nOutput:"


def parse_example(record: object) -> Document | str:
    """A labelled record as a one-example Document (`Input: ...\\nOutput: label`), or a reason."""
    parsed = parse_labelled(record)
    if isinstance(parsed, str):
        return parsed
    return Document(text=format_example(*parsed))


class ModerationSource:
    """Windows of labelled examples from one task's records (same interface as FileSource)."""

    def __init__(
        self, entry: TaskEntry, strict: bool, cycle: bool, tokenizer, seq_length: int
    ) -> None:
        self.inner = (HubSource if entry.kind == "hub" else FileSource)(entry, strict, cycle)
        self.inner.parse = parse_example
        self.name = entry.name
        self.tokenizer = tokenizer
        self.budget = int(seq_length) - 1  # tokens of a window before its EOS
        self.header_tokens = self._count(HEADER)
        # An example read but not placed: it did not fit, so it opens the next window.
        self.pending: str | None = None

    @property
    def malformed(self) -> dict[str, int]:
        return self.inner.malformed

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.pending = state.get("pending")

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def next_document(self) -> Document | None:
        """One window: header + as many examples as fit; None when a non-cycling task ends."""
        text, used = HEADER, self.header_tokens
        spans: list[tuple[int, int]] = []
        while used < self.budget:
            if self.pending is not None:
                example, self.pending = self.pending, None
            else:
                doc = self.inner.next_document()
                if doc is None:
                    break
                example = doc.text or ""
            piece = "\n\n" + example
            cost = self._count(piece)
            if spans and used + cost > self.budget:
                self.pending = example
                break
            # The label: from just after the example's `Output:` to its end (" casual").
            start = len(text) + len("\n\n") + example.rindex(_OUTPUT) + len(_OUTPUT)
            text += piece
            spans.append((start, len(text)))
            used += cost
        if not spans:
            return None
        return Document(text=text, spans=tuple(spans), window=True)
