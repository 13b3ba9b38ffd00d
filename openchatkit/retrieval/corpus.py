"""Reading a corpus and cutting it into passages of a few sentences.

Input is jsonl (one document per line: `text`, optional `title`), plain text or markdown files,
or folders of them. Each document is split into sentences and the sentences are grouped, in
order, into passages of `chunk_sentences` sentences (the original OpenChatKit Wikipedia index
used 3). A passage keeps its document's `title`, its `source` (file, or `file:line` for jsonl)
and its `position` (0-based index within the document), so neighbouring passages can be merged
back together at query time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from openchatkit.errors import UserError

TEXT_SUFFIXES = {".txt", ".text"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
JSONL_SUFFIXES = {".jsonl"}
CORPUS_SUFFIXES = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | JSONL_SUFFIXES

# A "sentence" longer than this many words (a table, a list without punctuation) is cut into
# pieces of this size: MiniLM reads at most 256 word pieces, so longer passages lose their tail.
MAX_SENTENCE_WORDS = 80

# Abbreviations whose trailing full stop does not end a sentence.
_ABBREVIATIONS = {
    "e.g", "i.e", "etc", "vs", "cf", "mr", "mrs", "ms", "dr", "prof", "st", "no", "fig",
    "approx", "inc", "ltd", "co", "jr", "sr", "al", "dept", "est", "mt", "jan", "feb", "mar",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
}  # fmt: skip
# Candidate boundary: terminal punctuation (plus closing quotes/brackets), whitespace, then
# something that can start a sentence.
_BOUNDARY = re.compile(r"""([.!?]+["')\]]*)\s+(?=["'(\[]?[A-Z0-9])""")
_MD_CODE_FENCE = re.compile(r"^\s*(```|~~~)")
_MD_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_EMPHASIS = re.compile(r"(\*\*|__|\*|`)")
_MD_LIST = re.compile(r"^\s*([-*+]|\d+[.)])\s+")


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: a few consecutive sentences of one document."""

    text: str
    title: str
    source: str
    position: int


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences; blank lines always end a sentence.

    A rule-based splitter (no model download): a boundary is `.`, `!` or `?` followed by
    whitespace and an upper-case letter, digit or opening quote, unless the word before the
    full stop is a known abbreviation or a single initial ("J. Smith").
    """
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            end = match.end(1)
            last_word = paragraph[start:end].rsplit(" ", 1)[-1].rstrip(".!?\"')]").lower()
            if match.group(1).startswith(".") and (
                last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha())
            ):
                continue
            sentences.append(paragraph[start:end])
            start = match.end()
        sentences.append(paragraph[start:])
    return [piece for s in sentences for piece in _cut_long(s.strip()) if piece]


def _cut_long(sentence: str) -> list[str]:
    words = sentence.split()
    if len(words) <= MAX_SENTENCE_WORDS:
        return [sentence]
    return [
        " ".join(words[i : i + MAX_SENTENCE_WORDS])
        for i in range(0, len(words), MAX_SENTENCE_WORDS)
    ]


def chunk_sentences(sentences: list[str], num_sentences: int) -> list[str]:
    """Group consecutive sentences into passages of `num_sentences` (the last may be shorter)."""
    if num_sentences < 1:
        raise ValueError(f"num_sentences must be >= 1, got {num_sentences}")
    return [
        " ".join(sentences[i : i + num_sentences]) for i in range(0, len(sentences), num_sentences)
    ]


def document_passages(text: str, title: str, source: str, num_sentences: int = 3) -> list[Passage]:
    """The passages of one document, positions 0, 1, … in reading order."""
    chunks = chunk_sentences(split_sentences(text), num_sentences)
    return [Passage(c, title, source, i) for i, c in enumerate(chunks)]


def markdown_sections(markdown: str) -> tuple[str | None, list[str]]:
    """Plain-text sections of a markdown document and its first heading (the title).

    Code blocks are dropped (they are not prose), headings start a new section so that no
    passage straddles two sections, and links/emphasis keep only their visible text.
    """
    title: str | None = None
    sections: list[list[str]] = [[]]
    in_code = False
    for line in markdown.splitlines():
        if _MD_CODE_FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        heading = _MD_HEADING.match(line)
        if heading:
            if title is None and heading.group(2):
                title = _md_inline(heading.group(2))
            sections.append([])
            continue
        line = _MD_LIST.sub("", line)
        # A list item or table row is its own sentence-ish unit: keep it on its own paragraph.
        sections[-1].append(_md_inline(line).strip(" |"))
    texts = ["\n".join(lines).strip() for lines in sections]
    return title, [t for t in texts if t]


def _md_inline(text: str) -> str:
    return _MD_EMPHASIS.sub("", _MD_LINK.sub(r"\1", text))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"--input {path}: cannot read ({err.strerror or err})") from err
    if b"\x00" in data[:8192]:
        raise UserError(f"--input {path}: looks binary; give text, markdown or jsonl files")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"--input {path}: not UTF-8 text (byte {err.start})") from err


def file_passages(path: Path, num_sentences: int = 3) -> Iterator[Passage]:
    """Passages of one corpus file, dispatched on its suffix (unknown suffixes read as text)."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"--input {path}:{line_no}: not valid JSON ({err.msg})") from err
            except RecursionError:  # a hostile line: brackets nested too deep to parse
                raise UserError(f"--input {path}:{line_no}: JSON nested too deep") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(
                    f"--input {path}:{line_no}: expected an object with a 'text' string"
                )
            title = record.get("title")
            title = str(title) if title is not None else path.stem
            yield from document_passages(record["text"], title, f"{path}:{line_no}", num_sentences)
    elif suffix in MARKDOWN_SUFFIXES:
        heading, sections = markdown_sections(text)
        title = heading or path.stem
        position = 0
        for section in sections:
            for chunk in chunk_sentences(split_sentences(section), num_sentences):
                yield Passage(chunk, title, str(path), position)
                position += 1
    else:
        yield from document_passages(text, path.stem, str(path), num_sentences)


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by the user: files as given, folders searched recursively for corpus files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES
            )
            if not found:
                logger.warning("--input {}: no .txt/.md/.jsonl files inside", path)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--input {path}: no such file or folder")
    return files


def read_corpus(paths: Iterable[str | Path], num_sentences: int = 3) -> list[Passage]:
    """All passages of all inputs, in input order; UserError when there are none."""
    paths = list(paths)
    if num_sentences < 1:
        raise UserError(f"--chunk-sentences must be >= 1, got {num_sentences}")
    passages: list[Passage] = []
    for path in expand_inputs(paths):
        passages.extend(file_passages(path, num_sentences))
    if not passages:
        names = " ".join(str(p) for p in paths)
        raise UserError(f"--input {names}: no text found (empty corpus)")
    return passages
