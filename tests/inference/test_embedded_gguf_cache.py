"""The embedded model's GGUF export for llama.cpp (openchatkit/inference/embedded_gguf.py): written
once into the user's cache with a message, reused silently after a size + sha256 check, written
again when damaged or outdated; and the bot's default backend for the embedded model."""

from __future__ import annotations

import json
import os

import pytest

from openchatkit.inference.embedded_gguf import (
    EMBEDDED_LLAMACPP_TYPE,
    embedded_llamacpp_file,
    gguf_cache_dir,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The real export into a temporary cache folder, and the messages it printed."""
    folder = tmp_path_factory.mktemp("cache")
    said: list[str] = []
    path = embedded_llamacpp_file(cache_dir=folder, say=said.append)
    return folder, path, said


def test_first_use_exports_with_a_message_then_reuses(exported):
    import gguf

    folder, path, said = exported
    assert path == folder / f"SmolLM2-135M-Instruct.{EMBEDDED_LLAMACPP_TYPE}.gguf"
    assert len(said) == 2 and "first use" in said[0] and str(path) in said[0]
    assert said[1].startswith("written in ") and " s; reused from now on" in said[1]
    record = json.loads((folder / (path.name + ".json")).read_text())
    assert record["bytes"] == path.stat().st_size and len(record["sha256"]) == 64
    assert record["outtype"] == EMBEDDED_LLAMACPP_TYPE
    reader = gguf.GGUFReader(path)
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert types == {EMBEDDED_LLAMACPP_TYPE.upper()}
    # No temporary files or half-written names left beside it.
    names = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))
    assert names == sorted([path.name, path.name + ".json", path.with_suffix(".Modelfile").name])
    # Reuse: silent, the same file untouched.
    mtime = path.stat().st_mtime_ns
    again: list[str] = []
    assert embedded_llamacpp_file(cache_dir=folder, say=again.append) == path
    assert again == [] and path.stat().st_mtime_ns == mtime


@pytest.fixture
def damaged_copy(exported, tmp_path, monkeypatch):
    """A copy of the exported cache in a fresh folder, and a counting stand-in for the export
    (the real export is the module fixture's; here only whether it is redone matters)."""
    import shutil

    import openchatkit.export.gguf as export_module

    folder, path, _ = exported
    copy = tmp_path / "cache"
    shutil.copytree(folder, copy)
    calls = []
    real = path.read_bytes()

    def fake_export(model, out, outtype, adapter=None, overwrite=False):
        calls.append((model, outtype, overwrite))
        out.write_bytes(real)
        return out

    monkeypatch.setattr(export_module, "export_gguf", fake_export)
    return copy / path.name, calls


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["flipped byte", "truncated", "record deleted", "record of another version", "file deleted"],
)
def test_damaged_or_outdated_cache_is_exported_again(damaged_copy, damage):
    path, calls = damaged_copy
    record = path.with_name(path.name + ".json")
    if damage == "flipped byte":  # same size: only the hash tells
        _flip_byte(path, path.stat().st_size // 2)
    elif damage == "truncated":
        os.truncate(path, path.stat().st_size - 1000)
    elif damage == "record deleted":
        record.unlink()
    elif damage == "record of another version":
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "export_version": data["export_version"] - 1}))
    else:
        path.unlink()
    said: list[str] = []
    assert embedded_llamacpp_file(cache_dir=path.parent, say=said.append) == path
    assert calls == [(None, EMBEDDED_LLAMACPP_TYPE, True)]
    assert "re-exporting (the cached file is damaged or outdated)" in said[0]
    # Whole again, and trusted: the next call reuses it without exporting.
    assert embedded_llamacpp_file(cache_dir=path.parent, say=said.append) == path
    assert len(calls) == 1


def test_intact_copy_is_reused_without_export(damaged_copy):
    path, calls = damaged_copy
    said: list[str] = []
    assert embedded_llamacpp_file(cache_dir=path.parent, say=said.append) == path
    assert calls == [] and said == []


def test_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache_dir() == tmp_path / "xdg" / "openchatkit" / "gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache_dir() == tmp_path / "home" / ".cache" / "openchatkit" / "gguf"


def test_embedded_model_defaults_to_llamacpp_when_the_binding_is_installed(monkeypatch):
    import openchatkit.inference.backends as backends
    from openchatkit.inference.backends import choose_backend

    for name in (None, "embedded", "SmolLM2-135M-Instruct"):
        assert choose_backend(name, "auto") == "llama.cpp"
        assert choose_backend(name, "auto", torch_flags=True) == "torch"
    assert choose_backend("some/folder", "auto") == "torch"
    monkeypatch.setattr(backends, "binding_available", lambda: False)
    assert choose_backend(None, "auto") == "torch"


def test_cached_export_answers_paris_on_llamacpp(exported):
    """The reason for the export: the shipped Q4_1 file answers this in French in llama.cpp."""
    import io

    from openchatkit.inference.backends import load_llamacpp_chat_model
    from openchatkit.inference.generation import GenerationSettings
    from openchatkit.inference.session import ChatSession
    from openchatkit.models.embedded import embedded_gguf_path

    _, path, _ = exported
    answers = {}
    for name, file in (("export", path), ("shipped", embedded_gguf_path())):
        loaded = load_llamacpp_chat_model(str(file), n_ctx=512, threads=1)
        out = io.StringIO()
        settings = GenerationSettings(max_tokens=12, sample=False)
        ChatSession(loaded, settings, out=out, err=io.StringIO()).say(
            "What is the capital of France?"
        )
        answers[name] = out.getvalue()
        loaded.model.close()
    assert "Paris" in answers["export"]
    assert "Paris" not in answers["shipped"]  # if this fails, llama.cpp changed: recheck Q4_1
