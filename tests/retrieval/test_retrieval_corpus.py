"""Corpus reading and sentence/passage splitting (pure functions, no model)."""

from __future__ import annotations

import json

import pytest

from openchatkit.errors import UserError
from openchatkit.retrieval.corpus import (
    MAX_SENTENCE_WORDS,
    chunk_sentences,
    markdown_sections,
    read_corpus,
    split_sentences,
)


def test_split_sentences_keeps_abbreviations_initials_and_decimals():
    text = (
        'Dr. Smith met J. Doe, e.g. at noon. Was it 3.5 km? "Yes." It was! '
        "Lower case after a stop. stays joined.\n\nA new paragraph without a stop"
    )
    assert split_sentences(text) == [
        "Dr. Smith met J. Doe, e.g. at noon.",
        "Was it 3.5 km?",
        '"Yes."',
        "It was!",
        "Lower case after a stop. stays joined.",
        "A new paragraph without a stop",
    ]


def test_split_sentences_cuts_runaway_sentences():
    words = " ".join(f"w{i}" for i in range(2 * MAX_SENTENCE_WORDS + 5))
    pieces = split_sentences(words)
    assert [len(p.split()) for p in pieces] == [MAX_SENTENCE_WORDS, MAX_SENTENCE_WORDS, 5]


def test_chunk_sentences_groups_in_order():
    assert chunk_sentences(["a.", "b.", "c.", "d."], 3) == ["a. b. c.", "d."]
    assert chunk_sentences([], 3) == []
    with pytest.raises(ValueError):
        chunk_sentences(["a."], 0)


def test_markdown_sections_drop_code_and_split_on_headings():
    title, sections = markdown_sections(
        "# My **Title**\n\nFirst [link](http://x) text.\n\n```\ncode. Here.\n```\n"
        "## Part\n\n- item one\n- item two\n"
    )
    assert title == "My Title"
    assert sections == ["First link text.", "item one\nitem two"]


def test_read_corpus_formats_titles_sources_positions(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "One. Two. Three. Four.", "title": "T"})
        + "\n\n"
        + json.dumps({"text": "Solo."})
        + "\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Heading\n\nAlpha. Beta.\n\n## Next\n\nGamma.\n")
    (tmp_path / "sub" / "c.txt").write_text("Plain text here.\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")  # not a corpus suffix: skipped in folders
    passages = read_corpus([tmp_path], num_sentences=3)
    got = [
        (p.title, p.source.replace(str(tmp_path) + "/", ""), p.position, p.text) for p in passages
    ]
    assert got == [
        ("T", "a.jsonl:1", 0, "One. Two. Three."),
        ("T", "a.jsonl:1", 1, "Four."),
        ("a", "a.jsonl:3", 0, "Solo."),
        ("Heading", "sub/b.md", 0, "Alpha. Beta."),
        ("Heading", "sub/b.md", 1, "Gamma."),
        ("c", "sub/c.txt", 0, "Plain text here."),
    ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", b'{"title": "no text"}\n', "expected an object with a 'text' string"),
        ("bin.txt", b"abc\x00def", "looks binary"),
        ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_read_corpus_rejects_unreadable_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_corpus([path])


def test_read_corpus_missing_and_empty(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        read_corpus([tmp_path / "nope"])
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="empty corpus"):
        read_corpus([tmp_path / "empty.txt"])
    with pytest.raises(UserError, match="--chunk-sentences"):
        read_corpus([tmp_path / "empty.txt"], num_sentences=0)
