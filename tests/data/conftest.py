"""Fixtures for the data tests: a character-level fast tokenizer (one token per character, so
masks can be checked character by character) and a jsonl writer."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
EOS = "<eos>"


def build_char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>")


@pytest.fixture(scope="session")
def char_tok():
    return build_char_tokenizer()


def _write_jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or raw strings written as they are) one per line."""
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _decode(tok, ids) -> str:
    """Characters of ids, EOS shown as '|' (one character per token)."""
    return "".join("|" if i == tok.eos_token_id else tok.convert_ids_to_tokens(int(i)) for i in ids)


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, records) -> path."""
    return _write_jsonl


@pytest.fixture(scope="session")
def decode():
    """decode(tok, ids) -> one character per token, EOS as '|'."""
    return _decode
