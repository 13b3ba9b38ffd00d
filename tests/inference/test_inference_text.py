"""Prompt formats, history truncation and stop-string hold-back, on a character tokenizer."""

from __future__ import annotations

from openchatkit.conversation import (
    OPENCHATKIT_CHAT_TEMPLATE,
    PromptFormat,
    fit_to_window,
    render_openchatkit,
    split_turns,
)
from openchatkit.inference.generation import IncrementalDecoder, StopStringBuffer

DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
]


def test_openchatkit_format_exact():
    text = render_openchatkit(DIALOGUE)
    assert text == (
        "Be brief.\n<human>: Hi\n<bot>: Hello!\n<human>: Capital of France?\n"
        "<bot>: Paris.\n<human>: And Italy?\n<bot>:"
    )
    assert render_openchatkit(DIALOGUE[:3], add_generation_prompt=False).endswith("<bot>: Hello!\n")


def test_openchatkit_chat_template_matches_renderer(make_char_tokenizer):
    tok = make_char_tokenizer(OPENCHATKIT_CHAT_TEMPLATE)
    fmt = PromptFormat.for_tokenizer(tok)
    assert fmt.use_chat_template
    for gen in (True, False):
        assert fmt.render(DIALOGUE, gen) == render_openchatkit(DIALOGUE, gen)


def test_format_choice_and_stops(make_char_tokenizer):
    plain = PromptFormat.for_tokenizer(make_char_tokenizer())
    assert not plain.use_chat_template and plain.stop_strings == ["<human>:"]
    templ = PromptFormat.for_tokenizer(make_char_tokenizer("{{ messages[0]['content'] }}"))
    assert templ.use_chat_template and templ.stop_strings == []
    # A model fine-tuned on OpenChatKit's format carries it as its template: still stop there.
    ock = PromptFormat.for_tokenizer(make_char_tokenizer(OPENCHATKIT_CHAT_TEMPLATE))
    assert ock.use_chat_template and ock.stop_strings == ["<human>:"]


def test_split_turns_groups_user_with_answers():
    system, turns = split_turns(DIALOGUE)
    assert system == DIALOGUE[:1]
    assert [len(t) for t in turns] == [2, 2, 1]


def test_fit_to_window_drops_oldest_whole_turns(make_char_tokenizer):
    fmt = PromptFormat.for_tokenizer(make_char_tokenizer())

    def count(msgs):
        return fmt.count_tokens(fmt.render(msgs))

    full = count(DIALOGUE)
    kept, dropped = fit_to_window(DIALOGUE, count, full)
    assert (kept, dropped) == (DIALOGUE, 0)
    # One character short: the oldest turn (Hi / Hello!) goes, as a whole.
    kept, dropped = fit_to_window(DIALOGUE, count, full - 1)
    assert dropped == 1 and kept == DIALOGUE[:1] + DIALOGUE[3:]
    # Tiny budget: system and newest turn always stay.
    kept, dropped = fit_to_window(DIALOGUE, count, 5)
    assert dropped == 2 and kept == [DIALOGUE[0], DIALOGUE[-1]]
    assert count(kept) > 5  # the caller sees it still does not fit and refuses


def feed(buffer, pieces):
    return [buffer.push(p) for p in pieces]


def test_stop_buffer_never_shows_partial_stop():
    buf = StopStringBuffer(["<human>:"])
    shown = feed(buf, ["Paris", " is nice.", "\n<", "hum", "an>", ":", " more"])
    assert "".join(shown) == "Paris is nice.\n"
    assert buf.stopped
    # Nothing held back was ever part of the stop string.
    assert all("<" not in s for s in shown)
    assert buf.push("late") == "" and buf.flush() == ""


def test_stop_buffer_releases_false_alarm_and_flushes():
    buf = StopStringBuffer(["<human>:"])
    assert buf.push("a <hu") == "a "
    assert buf.push("g") == "<hug"  # diverged from the stop string: released
    assert buf.push("<h") == ""
    assert buf.flush() == "<h"  # generation ended otherwise: held text is real output
    assert not buf.stopped


def test_stop_buffer_stop_inside_one_piece_and_several_stops():
    buf = StopStringBuffer(["###", "<human>:"])
    assert buf.push("x<human>: y ### z") == "x"
    buf = StopStringBuffer([])
    assert buf.push("<human>:") == "<human>:"


def test_incremental_decoder_reassembles_text(char_tokenizer):
    dec = IncrementalDecoder(char_tokenizer)
    ids = char_tokenizer("Hello, world", add_special_tokens=False)["input_ids"]
    assert "".join(dec.push(i) for i in ids) == "Hello, world"
