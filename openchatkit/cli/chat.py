"""What the chat entry points (`inference/bot.py`, `inference/serve.py`) load besides the model,
with errors named after the flag the user gave: the retrieval index (`--retrieval`) and the
moderation model (`--moderation`)."""

from __future__ import annotations

from openchatkit.errors import UserError


def check_chat_paths(retrieval: str | None, moderation: str | None, adapter: str | None) -> None:
    """The folders `--retrieval`, `--moderation` (when given as a path) and `--adapter` name,
    checked before the chat model loads: a typo is told in a fraction of a second instead of
    after seconds of importing torch and loading weights. The loaders check them again."""
    from pathlib import Path

    if retrieval is not None and not Path(retrieval).is_dir():
        raise UserError(f"--retrieval: no such index folder {retrieval}")
    if moderation and moderation.startswith(("/", "./", "../", "~")):
        if not Path(moderation).expanduser().is_dir():
            raise UserError(f"--moderation: folder {moderation} does not exist")
    if adapter is not None:
        check_adapter_folder(adapter)


def check_adapter_folder(folder: str, what: str = "--adapter") -> None:
    """A PEFT adapter folder holds adapter_config.json (what `attach_adapter` reads first)."""
    from pathlib import Path

    if not (Path(folder) / "adapter_config.json").is_file():
        raise UserError(
            f"{what} {folder}: no adapter_config.json (export one with tools/export_lora.py)"
        )


def load_retrieval(path: str | None):
    """The `--retrieval` index, or None without the flag."""
    if path is None:
        return None
    from openchatkit.models.quiet import quiet_transformers
    from openchatkit.retrieval import RetrievalIndex

    try:
        with quiet_transformers():  # the embedder's "Loading weights" bar is not chat
            return RetrievalIndex.load(path)
    except UserError as err:
        raise UserError(f"--retrieval: {err}") from err


def load_moderation(
    name: str | None,
    device: str,
    dtype: str,
    gpu_id: int,
    examples: str | None,
    loaded=None,
):
    """The `--moderation` Moderator, or None without the flag; `loaded` reuses the chat model
    (when the two flags name the same model on the torch backend)."""
    if name is None:
        return None
    from openchatkit.inference.moderator import load_moderator

    try:
        return load_moderator(
            name, device=device, dtype=dtype, gpu_id=gpu_id, examples=examples, loaded=loaded
        )
    except UserError as err:  # name the flag the user gave, not the loader's --model
        msg = str(err).removeprefix("--model").lstrip(": ")
        raise UserError(f"--moderation: {msg}") from err
