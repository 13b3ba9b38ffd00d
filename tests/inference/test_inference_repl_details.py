"""REPL details found by trying the bot as a new user would: /raw_prompt shows the prompt as
cut to the window, an oversized system message is named, /set refuses values that cannot work
and hints when sampling is off, Ctrl-C before the first word keeps no empty turn, /save writes
only regular files in existing folders, and bytes that are not UTF-8 do not crash a turn."""

from __future__ import annotations

import io
import os

import pytest

from openchatkit.inference.generation import GenerationSettings
from openchatkit.inference.session import ChatSession
from openchatkit.models.loading import LoadedModel


@pytest.fixture
def session(char_tokenizer, scripted_model):
    def make(script="Paris.", window=4096, system=None, model=None, max_tokens=128):
        model = model or scripted_model(char_tokenizer, script)
        loaded = LoadedModel(model, char_tokenizer, "tiny", "cpu", "float32", window)
        out, err = io.StringIO(), io.StringIO()
        settings = GenerationSettings(sample=False, max_tokens=max_tokens)
        s = ChatSession(loaded, settings, system=system, out=out, err=err)
        return s, model, out, err

    return make


def test_raw_prompt_shows_the_prompt_as_cut_to_the_window(session):
    s, _, out, err = session(script="ok", window=120, max_tokens=20)
    for i in range(6):
        s.handle_line(f"question number {i} about things")
    out.truncate(0), out.seek(0)
    s.handle_line("/raw_prompt")
    shown = out.getvalue()
    assert "question number 5" in shown
    assert "question number 0" not in shown  # dropped from the real prompt, so not shown
    assert "no longer fit the window" in err.getvalue()


def test_an_oversized_system_message_is_named(session):
    s, _, _, err = session(window=200, max_tokens=20, system="be brief " * 40)
    assert s.say("hi") is None
    assert "system message is too long" in err.getvalue()
    assert s.messages == []


@pytest.mark.parametrize(
    "line, message",
    [
        ("/set temperature inf", "finite"),
        ("/set temperature nan", "finite"),
        ("/set max_tokens 4096", "below the 4096-token context window"),
    ],
)
def test_set_refuses_values_that_cannot_work(session, line, message):
    s, _, _, err = session()
    before = s.settings.as_dict()
    s.handle_line(line)
    assert message in err.getvalue()
    assert s.settings.as_dict() == before


def test_set_sampling_knob_while_greedy_says_so(session):
    s, _, _, err = session()
    s.handle_line("/set temperature 0.8")
    assert "sampling is off" in err.getvalue() and s.settings.temperature == 0.8
    err.truncate(0), err.seek(0)
    s.handle_line("/set sample on")
    s.handle_line("/set temperature 0.5")
    assert "sampling is off" not in err.getvalue()


def test_ctrl_c_before_the_first_word_keeps_no_turn(session, char_tokenizer, scripted_model):
    class Interrupted(scripted_model):
        def forward(self, *args, **kwargs):
            raise KeyboardInterrupt

    s, _, _, err = session(model=Interrupted(char_tokenizer, "x"))
    s.handle_line("hello")
    assert s.messages == []
    assert "(stopped)" in err.getvalue()


def test_non_utf8_input_is_replaced_not_fatal(session):
    s, model, out, _ = session()
    line = b"caf\xff ok".decode("utf-8", "surrogateescape")  # what a pipe or argv gives
    assert s.handle_line(line)
    assert out.getvalue() == "Paris.\n"
    assert s.messages[0]["content"] == "caf\ufffd ok"


def test_save_refuses_devices_symlinks_folders_and_missing_parents(session, tmp_path):
    s, _, _, err = session()
    s.handle_line("hello")
    target = tmp_path / "real.json"
    target.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    for path, why in (
        ("/dev/null", "not a regular file"),
        (str(link), "symlink"),
        (str(tmp_path), "not a regular file"),
        (str(tmp_path / "no" / "such" / "chat.json"), "does not exist"),
    ):
        err.truncate(0), err.seek(0)
        s.handle_line(f"/save {path}")
        assert why in err.getvalue(), (path, err.getvalue())
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert link.is_symlink() and target.read_text() == "keep"
    assert not (tmp_path / "no").exists()
    s.handle_line(f"/save! {target}")  # /save! replaces a file that is not a saved chat
    assert '"messages"' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]
