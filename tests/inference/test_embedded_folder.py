"""Starting the bot without --model never deletes the user's files: the embedded model's folder
`huggingface_models/SmolLM2-135M-Instruct` is replaced only when the kit wrote it (its marker
file); a folder of the user's own there is refused in one line and left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openchatkit.errors import UserError
from openchatkit.models import embedded


def _user_folder(dest: Path) -> dict[str, str]:
    dest.mkdir(parents=True)
    files = {"config.json": "{}", "model.safetensors": "weights", "notes.txt": "mine"}
    for name, text in files.items():
        (dest / name).write_text(text)
    return files


@pytest.fixture
def fake_conversion(monkeypatch):
    """The GGUF conversion replaced by a one-file stand-in (the real one takes ~20 s)."""
    calls = []

    def convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text('{"converted": true}')

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", convert)
    return calls


def test_a_folder_of_the_users_own_is_refused_and_kept(tmp_path, fake_conversion):
    dest = tmp_path / "huggingface_models" / embedded.EMBEDDED_MODEL_NAME
    files = _user_folder(dest)
    with pytest.raises(UserError, match=f"{dest} is a folder the kit did not write"):
        embedded.ensure_embedded_model(dest)
    assert {p.name: p.read_text() for p in dest.iterdir()} == files
    assert fake_conversion == []


def test_a_folder_the_kit_wrote_is_replaced_when_stale(tmp_path, fake_conversion):
    dest = tmp_path / embedded.EMBEDDED_MODEL_NAME
    dest.mkdir()
    (dest / embedded.MARKER).write_text(json.dumps({"conversion": 0}))  # an older conversion
    (dest / "config.json").write_text("old")
    assert embedded.ensure_embedded_model(dest) == dest
    assert len(fake_conversion) == 1
    assert json.loads((dest / "config.json").read_text()) == {"converted": True}
    assert embedded.ensure_embedded_model(dest) == dest  # current now: not converted again
    assert len(fake_conversion) == 1


def test_missing_or_empty_folder_is_converted_a_file_or_symlink_refused(tmp_path, fake_conversion):
    empty = tmp_path / "empty"
    empty.mkdir()
    embedded.ensure_embedded_model(empty)
    embedded.ensure_embedded_model(tmp_path / "new")
    assert len(fake_conversion) == 2
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(empty)
    for name, what in (("file", "not a folder"), ("link", "a symlink")):
        with pytest.raises(UserError, match=what):
            embedded.ensure_embedded_model(tmp_path / name)
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "link").is_symlink()


def test_the_bot_without_model_refuses_in_one_line(tmp_path, cli):
    dest = tmp_path / "huggingface_models" / embedded.EMBEDDED_MODEL_NAME
    files = _user_folder(dest)
    # Both backends need the converted folder: torch loads it, llama.cpp exports its GGUF file
    # from it on first use (an empty cache folder here; a valid cached file needs no folder).
    env = cli.user_env(OPENCHATKIT_HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))
    for backend in ("torch", "auto"):
        proc = cli.run("inference/bot.py", "--prompt", "hi", "--backend", backend, env=env)
        cli.assert_one_line_error(proc, "did not write")
        assert {p.name: p.read_text() for p in dest.iterdir()} == files
