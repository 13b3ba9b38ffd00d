"""Moderation in the original GPT-JT-Moderation-6B format: five labels, few-shot prompt, parsing.

The prompt is the original's (so GPT-JT-Moderation-6B itself works unchanged):

    Possible labels:
    1. casual
    2. needs caution
    3. needs intervention
    4. possibly needs caution
    5. probably needs caution

    Input: <few-shot text>
    Output: <its label>

    Input: <text to classify>
    Output:

This module is the format only (torch-free: `data/moderation.py` packs training text with it).
The scoring model is `openchatkit.inference.moderator.Moderator`; accuracy and confusion metrics
are in `openchatkit.evaluation.moderation_metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from openchatkit.errors import UserError

LABELS = (
    "casual",
    "needs caution",
    "needs intervention",
    "possibly needs caution",
    "probably needs caution",
)
INTERVENTION = "needs intervention"
# The bot's refusal rule (see `refuses`): refuse when p(needs intervention) reaches this, even
# when another label is more likely. Chosen on the held-out split (valid.jsonl, families the
# model never trained on) of the demo model (`moderate.py --eval ... --sweep`), never on
# check.jsonl: the lowest threshold (most caught) that refuses at most 5 % of casual messages
# there. See README "Moderation".
INTERVENTION_THRESHOLD = 0.35
# Labels for which the bot adds CAUTION_INSTRUCTION to that turn's system prompt.
CAUTION_LABELS = ("needs caution", "probably needs caution")
HEADER = "Possible labels:\n" + "\n".join(f"{i}. {label}" for i, label in enumerate(LABELS, 1))
# What the original's hosted demo answered when its moderation model intervened.
REFUSAL = (
    "I'm sorry, but I cannot help with this question as it was flagged by my moderation model."
)
CAUTION_INSTRUCTION = (
    "The moderation model flagged the user's last message as sensitive. Answer with care: stay "
    "kind and calm, do not give instructions that could hurt anyone, and where it fits suggest "
    "talking to someone they trust or to a professional."
)

# Built-in few-shot examples (written for this project, mild on purpose), one per label.
DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Can you suggest a good book for a long train ride?", "casual"),
    (
        "My landlord ignores my emails and it is really starting to annoy me.",
        "possibly needs caution",
    ),
    ("I can't stand my roommate anymore, I'm about to lose it with him.", "probably needs caution"),
    ("People like you are worthless and nobody should listen to you.", "needs caution"),
    ("I want to make my neighbour suffer for what he did to me.", "needs intervention"),
)


@dataclass
class Classification:
    """One result of a moderator (either kind): the most likely label, its probability, and all
    five probabilities."""

    label: str
    probability: float
    probabilities: dict[str, float]

    @classmethod
    def from_row(cls, row: Sequence[float]) -> Classification:
        """The result for one row of five probabilities, in LABELS order."""
        best = max(range(len(LABELS)), key=row.__getitem__)
        return cls(LABELS[best], row[best], dict(zip(LABELS, row, strict=True)))


def refuses(probabilities: dict[str, float], threshold: float | None = None) -> bool:
    """The bot's policy: refuse a message when p(needs intervention) >= threshold (None:
    INTERVENTION_THRESHOLD), whichever label is the most likely. Below 0.2 (one in five) this
    includes every message whose top label is `needs intervention`."""
    threshold = INTERVENTION_THRESHOLD if threshold is None else threshold
    return probabilities[INTERVENTION] >= threshold


def format_example(text: str, label: str | None = None) -> str:
    """`Input: text\\nOutput: label`, or the query form ending in `Output:` when label is None."""
    return f"Input: {text}\nOutput:" + (f" {label}" if label is not None else "")


def build_prompt(text: str, examples: Sequence[tuple[str, str]] = DEFAULT_EXAMPLES) -> str:
    """The whole classification prompt for `text` (what `Moderator` scores, as one string)."""
    shots = "".join("\n\n" + format_example(t, lab) for t, lab in examples)
    return f"{HEADER}{shots}\n\n{format_example(text)}"


def normalise_label(raw: object) -> str | None:
    """One of LABELS from a raw tag: `needs caution`, `__needs_intervention__`, `Casual`, or an
    OIG-moderation tag string such as `needs caution | sexual content` (the first base tag wins).
    None when no part is one of the five."""
    parts = raw if isinstance(raw, list) else str(raw).split("|")
    for part in parts:
        if not isinstance(part, str):
            continue
        name = re.sub(r"[\s_]+", " ", part).strip().lower()
        if name in LABELS:
            return name
    return None


_INPUT_OUTPUT = re.compile(r"^\s*Input:\s*(.*?)\s*\nOutput:\s*(.*?)\s*$", re.DOTALL)


def parse_labelled(record: object) -> tuple[str, str] | str:
    """(text, label) of a labelled record, or a short reason string when it cannot be used.

    Accepted: `{"text": ..., "label": ...}` (this kit's sample and --eval files), `labels` instead
    of `label` (a tag string or a list), or a `text` already in the `Input: ...\\nOutput: label`
    form that the original's packer consumed.
    """
    if not isinstance(record, dict):
        return "not a JSON object"
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        return "no non-empty `text`"
    raw = record.get("label", record.get("labels"))
    if raw is None:
        m = _INPUT_OUTPUT.match(text)
        if not m:
            return "no `label` field (and `text` is not `Input: ...\\nOutput: label`)"
        text, raw = m.group(1), m.group(2)
    label = normalise_label(raw)
    if label is None:
        return f"label {raw!r} is not one of: {', '.join(LABELS)}"
    return text.strip(), label


def _json_lines(path: Path, what: str) -> list[tuple[int, object]]:
    """(line number, value or `Invalid` reason) of each non-blank line, through the kit's bounded
    reader (an over-long or deeply nested line is a bad line, never a crash)."""
    from openchatkit.data.jsonl import iter_json_lines

    try:
        with open(path, "rb") as f:
            return list(iter_json_lines(f))
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except OSError as err:
        raise UserError(f"{what} {path}: cannot read: {err.strerror or err}") from None


def read_labelled(path: str | Path, what: str = "--eval") -> list[tuple[str, str]]:
    """All (text, label) records of a jsonl file; any bad line is a UserError that counts them."""
    from openchatkit.data.jsonl import Invalid

    path = Path(path)
    lines = _json_lines(path, what)
    records, bad = [], []
    for number, value in lines:
        parsed = value if isinstance(value, Invalid) else parse_labelled(value)
        if isinstance(parsed, str):
            bad.append((number, parsed))
        else:
            records.append(parsed)
    if bad:
        number, reason = bad[0]
        raise UserError(
            f"{what} {path}: {len(bad)} bad line(s) of {len(lines)}, first line {number}: {reason}"
        )
    if not records:
        raise UserError(f"{what} {path}: no labelled records (need `text` and `label`)")
    return records


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """Few-shot examples from a jsonl file of `{"text": ..., "label": ...}` records."""
    return read_labelled(path, what="--examples")


def read_texts(path: str | Path) -> list[str]:
    """The `text` of every record of a jsonl file; bad lines are a UserError that counts them."""
    path = Path(path)
    lines = _json_lines(path, "--input")
    texts, bad = [], []
    for number, record in lines:
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            texts.append(text)
        else:
            bad.append(number)
    if bad:
        raise UserError(
            f"--input {path}: {len(bad)} bad line(s) of {len(lines)} (not JSON, or no non-empty "
            f"`text`), first line {bad[0]}"
        )
    if not texts:
        raise UserError(f"--input {path}: no records")
    return texts
