"""The moderation packer: `NAME:moderation` in --task-name, header-led windows, label-only loss,
no example lost between windows, exact resume."""

from __future__ import annotations

import json
import re

import pytest

from openchatkit.data import PackedSequenceStream, parse_task_spec
from openchatkit.errors import UserError
from openchatkit.moderation import HEADER, LABELS

RECORDS = [
    {"text": "Can you help me bake bread?", "label": "casual"},
    {"text": "I hate Mondays so much.", "labels": "possibly needs caution | other"},
    {"text": "Input: You are a useless machine.\nOutput: needs caution"},
    {"text": "I want to make him pay for it.", "label": "__needs_intervention__"},
    {"text": "I feel low and alone lately.", "label": "probably needs caution"},
    {"text": "What is the capital of Peru?", "label": "casual"},
    {"text": "no label here"},  # malformed: skipped and counted
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "mod.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_spec_format_suffix(data):
    (entry,) = parse_task_spec(f"{data}:moderation")
    assert entry.format == "moderation" and entry.weight == 1.0
    a, b = parse_task_spec(f"{data}:moderation:0.25,{data}:0.75")
    assert (a.format, a.weight, b.format, b.weight) == ("moderation", 0.25, "text", 0.75)
    assert parse_task_spec(f"{data}:text:2")[0].format == "text"
    with pytest.raises(UserError, match="not a number and not a format"):
        parse_task_spec(f"{data}:moderatoin")


def examples_of(text: str) -> list[tuple[str, str]]:
    return re.findall(r"Input: (.*?)\nOutput: (.*?)(?=\n\n|<eos>|$)", text)


def test_windows_start_with_header_and_learn_labels_only(data, char_tokenizer):
    seq = 240
    stream = PackedSequenceStream(
        f"{data}:moderation", char_tokenizer, seq, loss_on="bot", cycle=False
    )
    items = list(stream)
    seen = []
    for item in items:
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert len(ids) == seq
        text = char_tokenizer.decode(ids)
        assert text.startswith(HEADER + "\n\nInput: ")
        pairs = examples_of(text)
        assert pairs and all(label in LABELS for _, label in pairs)
        seen += pairs
        learned = char_tokenizer.decode(
            [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
        )
        # Only " label" after each Output:, then the window's EOS; padding is not learned.
        assert learned == "".join(" " + label for _, label in pairs) + "<eos>"
    # Every usable record once, in order: the one that did not fit opened the next window.
    want = [
        ("Can you help me bake bread?", "casual"),
        ("I hate Mondays so much.", "possibly needs caution"),
        ("You are a useless machine.", "needs caution"),
        ("I want to make him pay for it.", "needs intervention"),
        ("I feel low and alone lately.", "probably needs caution"),
        ("What is the capital of Peru?", "casual"),
    ]
    assert seen == want and len(items) > 1
    assert stream.malformed_counts() == {str(data): 1}


def test_loss_on_all_learns_the_whole_window(data, char_tokenizer):
    stream = PackedSequenceStream(f"{data}:moderation", char_tokenizer, 240, loss_on="all")
    item = next(stream)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    text_len = len(char_tokenizer.decode(ids).split("<eos>")[0])
    assert all(lab != -100 for lab in labels[: text_len + 1])  # text and its EOS
    assert all(lab == -100 for lab in labels[text_len + 1 :])  # padding


def test_resume_is_exact(data, char_tokenizer):
    def stream():
        return PackedSequenceStream(
            f"{data}:moderation", char_tokenizer, 200, docs_per_chunk=3, seed=3
        )

    a = stream()
    for _ in range(4):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(a)["input_ids"].tolist() for _ in range(5)]
    b = stream()
    b.load_state_dict(state)
    assert [next(b)["input_ids"].tolist() for _ in range(5)] == want
