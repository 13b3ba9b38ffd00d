"""ChatSession commands on a scripted model: save/load, raw prompt, settings, truncation."""

from __future__ import annotations

import io
import json

import pytest

from openchatkit.inference.generation import GenerationSettings
from openchatkit.inference.session import ChatSession
from openchatkit.models.loading import LoadedModel


@pytest.fixture
def session(char_tokenizer, scripted_model):
    def make(script="Paris.", window=4096, system=None):
        model = scripted_model(char_tokenizer, script)
        loaded = LoadedModel(model, char_tokenizer, "tiny", "cpu", "float32", window)
        out, err = io.StringIO(), io.StringIO()
        s = ChatSession(loaded, GenerationSettings(sample=False), system=system, out=out, err=err)
        return s, model, out, err

    return make


def test_turns_are_kept_and_shown_in_raw_prompt(session):
    s, model, out, err = session(system="Be brief.")
    assert s.handle_line("What is the capital of France?")
    assert out.getvalue() == "Paris.\n"
    assert "prompt" in err.getvalue() and "tokens/s" in err.getvalue()
    assert s.messages[-1] == {"role": "assistant", "content": "Paris."}
    s.handle_line("/raw_prompt")
    assert "Be brief.\n<human>: What is the capital of France?\n<bot>: Paris.\n" in out.getvalue()


def test_save_load_round_trip(session, tmp_path):
    s, _, out, err = session()
    s.handle_line("Hello")
    s.handle_line("/set temperature 0.3")
    s.handle_line("/system You are terse.")
    path = tmp_path / "chat.json"
    s.handle_line(f"/save {path}")
    saved = json.loads(path.read_text())
    assert saved["model"] == "tiny" and saved["messages"][0]["content"] == "Hello"
    t, _, _, err2 = session()
    t.handle_line(f"/load {path}")
    assert t.messages == s.messages and t.system == "You are terse."
    assert t.settings.temperature == 0.3 and "loaded 2 messages" in err2.getvalue()
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not a saved chat"),
        ('{"format": "other"}', "not a saved chat"),
        ('{"format": "openchatkit-chat", "messages": [{"role": "x"}]}', "message 0"),
        ('{"format": "openchatkit-chat", "messages": [], "settings": {"top_p": 7}}', "top_p"),
    ],
)
def test_load_bad_files_keep_session(session, tmp_path, content, message):
    s, _, _, err = session()
    s.handle_line("Hello")
    before = list(s.messages)
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert s.handle_line(f"/load {path}")
    lines = err.getvalue().strip().splitlines()
    assert message in lines[-1] and s.messages == before


@pytest.mark.parametrize(
    "line, message",
    [
        ("/set temperature -1", "must be >= 0"),
        ("/set top_p 0", "(0, 1]"),
        ("/set max_tokens zero", "bad value"),
        ("/set sample maybe", "expected on or off"),
        ("/set colour blue", "unknown setting"),
        ("/set temperature", "usage"),
        ("/frobnicate", "/help"),
        ("/save", "needs FILE"),
    ],
)
def test_bad_commands_one_line(session, line, message):
    s, _, _, err = session()
    assert s.handle_line(line)
    assert err.getvalue().count("\n") == 1 and message in err.getvalue()


def test_set_applies_and_verbose_off(session):
    s, _, out, err = session()
    for line in ("/set top_k 5", "/set sample on", "/set seed 7", "/set max_tokens 9"):
        s.handle_line(line)
    assert (s.settings.top_k, s.settings.sample, s.settings.seed) == (5, True, 7)
    s.handle_line("/set seed none")
    assert s.settings.seed is None
    s.handle_line("/hyperparameters")
    assert "max_tokens = 9" in out.getvalue()
    s.handle_line("/set verbose off")
    n = len(err.getvalue())
    s.handle_line("Hi")
    assert "tokens/s" not in err.getvalue()[n:]


def test_empty_input_ignored_and_quit(session):
    s, model, out, _ = session()
    assert s.handle_line("   ") and model.calls == 0 and out.getvalue() == ""
    assert s.handle_line("/quit") is False
    assert s.handle_line("/?") and "/raw_say" in out.getvalue()


def test_raw_say_sends_text_unformatted(session, char_tokenizer):
    s, model, out, _ = session(script=" world")
    s.handle_line("/raw_say Hello")
    assert model.prompts[-1] == char_tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert out.getvalue() == "world\n" and s.messages == []


def test_history_cut_to_window_with_one_notice(session):
    # Window 120 chars, max_tokens 20 -> 100-token prompt budget: old turns must go.
    s, model, _, err = session(script="ok", window=120)
    s.settings.max_tokens = 20
    for i in range(8):
        s.handle_line(f"message number {i}")
    assert len(model.prompts[-1]) <= 100
    last_prompt = "".join(s.loaded.tokenizer.decode(model.prompts[-1]))
    assert "message number 7" in last_prompt and "message number 0" not in last_prompt
    assert err.getvalue().count("context window") == 1
    assert len(s.messages) == 16  # the history itself is kept (for /save)


def test_too_long_message_refused(session):
    s, model, _, err = session(window=40)
    s.settings.max_tokens = 10
    s.handle_line("x" * 60)
    assert model.calls == 0 and "too long" in err.getvalue() and s.messages == []


class FakeRetriever:
    """Stands in for RetrievalIndex: returns fixed hits and records the queries."""

    def __init__(self):
        from openchatkit.retrieval import Hit

        self.queries: list[tuple[str, int]] = []
        self.hit = Hit(
            text="The Zorblat tower is 812 metres tall.",
            title="Zorblat",
            source="z.md",
            position=0,
            score=0.91,
            row=0,
            first_position=0,
            last_position=0,
        )

    def search(self, query, k):
        self.queries.append((query, k))
        return [self.hit][:k]

    def __len__(self):
        return 1


def test_retrieval_context_in_this_turn_only(session, char_tokenizer):
    s, model, out, err = session(script="812 metres.")
    s.retriever, s.retrieval_on = FakeRetriever(), True
    s.handle_line("How tall is the Zorblat tower?")
    prompt = char_tokenizer.decode(model.prompts[-1])
    assert "<context>" in prompt and "812 metres tall" in prompt
    assert prompt.rstrip().endswith("How tall is the Zorblat tower?\n<bot>:")
    # The history keeps the user's own words, not the context block.
    assert s.messages[0] == {"role": "user", "content": "How tall is the Zorblat tower?"}
    s.handle_line("/context")
    assert "score 0.910" in out.getvalue() and "Zorblat (z.md)" in out.getvalue()
    s.handle_line("/set retrieval_k 5")
    s.handle_line("/retrieval off")
    s.handle_line("Thanks")
    assert "<context>" not in char_tokenizer.decode(model.prompts[-1])
    assert s.retriever.queries == [("How tall is the Zorblat tower?", 3)]
    s.handle_line("/retrieval on")
    s.handle_line("Again?")
    assert s.retriever.queries[-1] == ("Again?", 5)


def test_retrieval_commands_without_index(session):
    s, _, _, err = session()
    s.handle_line("/context")
    s.handle_line("/retrieval on")
    assert err.getvalue().count("--retrieval INDEX_DIR") == 2


def test_retrieval_context_respects_window(session, char_tokenizer):
    # A 400-token window with max_tokens 20: the context is cut to what is left.
    s, model, _, _ = session(script="ok", window=400)
    s.settings.max_tokens = 20
    s.retriever, s.retrieval_on = FakeRetriever(), True
    s.retriever.hit.text = "word " * 400
    s.handle_line("Question?")
    assert 340 < len(model.prompts[-1]) <= 380 and "<context>" in char_tokenizer.decode(
        model.prompts[-1]
    )


def test_trailing_whitespace_before_stop_is_not_shown(session):
    s, _, out, _ = session(script=" Paris.\n\n<human>: more")
    s.handle_line("Capital?")
    assert out.getvalue() == "Paris.\n" and s.messages[-1]["content"] == "Paris."


def test_read_generation_defaults_only_keys_the_file_sets(tmp_path):
    from openchatkit.models.loading import read_generation_defaults

    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "eos_token_id": 2, "top_p": None})
    )
    assert read_generation_defaults(str(tmp_path)) == {"do_sample": True, "temperature": 0.7}
    assert read_generation_defaults(str(tmp_path / "missing")) == {}
