"""Checks the trainer runs before torch is imported and before any process group exists, so a
wrong path costs a fraction of a second instead of a traceback after the model is built:
the checkpoint folder can be written, and the tokenizer can be found."""

from __future__ import annotations

import os
from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.fileio import check_writable_dir

# Any one of these makes a folder something AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """--checkpoint-path is a folder (or can be made) that this user can write."""
    return check_writable_dir(path, "--checkpoint-path")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name) or name.count("/") > 1


def check_tokenizer(name: str, flag: str) -> None:
    """`name` is a local folder holding tokenizer files, or a hub id that is cached or that the
    hub serves now (one short probe). `flag` names it in the UserError."""
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(f"{flag} {name}: no such folder")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            hint = " (pass --tokenizer-name)" if flag == "--model-name" else ""
            raise UserError(f"{flag} {name}: no tokenizer files there{hint}")
        return
    from openchatkit.hub import check_hub_repo, is_cached

    if not any(is_cached(name, f) for f in ("tokenizer_config.json", "tokenizer.json")):
        check_hub_repo(name, what=flag)
