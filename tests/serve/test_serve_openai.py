"""The server with the official `openai` client: answers streamed and not, usage, finish
reasons, the moderation refusal, retrieval's sources, history fitting, and the feedback loop."""

from __future__ import annotations

import contextlib
import json

import pytest

openai = pytest.importorskip("openai")

from openchatkit.moderation import REFUSAL  # noqa: E402


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@contextlib.contextmanager
def moderation_on(served):
    served.service.moderator = served.moderator
    try:
        yield served.moderator
    finally:
        served.service.moderator = None
        served.moderator.flag_answers = False


def ask(client, text, **kw):
    return client.chat.completions.create(
        model=kw.pop("model", "tiny-chat"),
        messages=kw.pop("messages", None) or [{"role": "user", "content": text}],
        **kw,
    )


def test_models_and_health(served, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "hi", model="gpt-4o")
    assert "tiny-chat" in str(err.value)


def test_answer_streamed_equals_answer_whole(served, client):
    """Greedy: the streamed pieces join to the non-streamed answer; usage counts agree with the
    tokenizer and max_tokens; the prompt is the chat session's."""
    served.backend.prompts.clear()
    whole = ask(client, "Hello there", max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert isinstance(text, str) and text == text.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert 1 <= whole.usage.completion_tokens <= 12
    assert served.backend.prompts[-1] == "<human>: Hello there\n<bot>:"
    assert whole.usage.prompt_tokens == len("<human>: Hello there\n<bot>:")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = ask(
        client,
        "Hello there",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_max_tokens_gives_length(served, client):
    out = ask(client, "Tell me a story", max_completion_tokens=3, temperature=0, stop=["zzzz"])
    # The random model may end early with EOS; when it does not, it is cut at 3 tokens.
    assert out.usage.completion_tokens <= 3
    if out.usage.completion_tokens == 3:
        assert out.choices[0].finish_reason == "length"


def test_history_and_system_in_the_prompt(served, client):
    served.backend.prompts.clear()
    ask(
        client,
        None,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
        max_tokens=2,
    )
    assert served.backend.prompts[-1] == (
        "Be brief.\n<human>: Hi\n<bot>: Hello!\n<human>: Bye\n<bot>:"
    )


def test_old_turns_dropped_to_fit_the_window(served, client):
    """256-token window, max_tokens 8: 10 turns of ~100 characters cannot all fit."""
    turns = []
    for i in range(10):
        turns += [
            {"role": "user", "content": f"question {i} " + "x" * 40},
            {"role": "assistant", "content": f"answer {i} " + "y" * 40},
        ]
    turns.append({"role": "user", "content": "last question"})
    served.backend.prompts.clear()
    out = ask(client, None, messages=turns, max_tokens=8)
    prompt = served.backend.prompts[-1]
    assert prompt.endswith("<human>: last question\n<bot>:") and "question 0 " not in prompt
    assert len(prompt) <= 256 - 8
    assert out.model_extra["openchatkit"]["dropped_turns"] > 0


def test_prompt_longer_than_the_window(served, client):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "z" * 400, max_tokens=8)
    body = err.value.body
    assert body["code"] == "context_length_exceeded"
    assert "416 tokens" in body["message"] and "max_tokens is 8" in body["message"]


def test_refusal_of_a_flagged_message(served, client):
    with moderation_on(served) as moderator:
        served.backend.prompts.clear()
        out = ask(client, "something FLAGGED here")
        assert out.choices[0].message.content == REFUSAL
        assert out.choices[0].finish_reason == "content_filter"
        assert served.backend.prompts == []  # the chat model was not called
        stream = list(ask(client, "again FLAGGED", stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == REFUSAL
        assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "content_filter"
        # A clean message is answered, and both turns were classified.
        moderator.seen.clear()
        out = ask(client, "a fine USERTURN")
        assert out.choices[0].finish_reason in ("stop", "length")
        assert moderator.seen[0] == "a fine USERTURN"


def test_refusal_of_a_flagged_answer(served, client):
    with moderation_on(served) as moderator:
        moderator.flag_answers = True
        out = ask(client, "USERTURN hello", max_tokens=6, temperature=0)
        assert out.usage.completion_tokens > 0  # greedy on a fixed model: a non-empty answer
        assert out.choices[0].message.content == REFUSAL
        assert out.choices[0].finish_reason == "content_filter"
        notes = out.model_extra["openchatkit"]["moderation"]
        assert notes[0].startswith("user casual") and notes[1].startswith("bot needs interv")


def test_retrieval_passages_and_sources(served, client):
    served.service.retriever = served.retriever
    try:
        served.backend.prompts.clear()
        out = ask(client, "What is the capital of Paris?", max_tokens=4)
        assert "Paris is the capital of France." in served.backend.prompts[-1]
        sources = out.model_extra["openchatkit"]["sources"]
        assert [(s["title"], s["source"]) for s in sources] == [("Paris", "wiki/Paris")]
        chunks = list(ask(client, "Paris again", max_tokens=2, stream=True))
        final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
        assert final.model_extra["openchatkit"]["sources"][0]["source"] == "wiki/Paris"
    finally:
        served.service.retriever = None


def test_feedback_then_two_training_steps(served, training_helpers, tmp_path):
    """Feedback over HTTP (as the page sends it), then the trainer takes two steps on the file."""
    import httpx

    url = served.url + "/v1/feedback"
    convo = [{"role": "user", "content": "the cat sat"}]
    posts = [
        {"messages": convo, "answer": "on the mat", "rating": "up"},
        {"messages": convo, "answer": "blue moon", "rating": "down", "correction": "the dog ran"},
        {"messages": convo, "answer": "red sun", "rating": "down"},  # not training data
    ]
    saved = [httpx.post(url, json=body, timeout=30).json()["saved"] for body in posts]
    assert saved == [True, True, False]
    bad = httpx.post(url, json={"messages": convo, "answer": "x", "rating": "meh"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    records = [json.loads(line) for line in served.feedback.read_text().splitlines()]
    assert [r["text"] for r in records] == [
        "<human>: the cat sat\n<bot>: on the mat",
        "<human>: the cat sat\n<bot>: the dog ran",
    ]
    assert [r["rating"] for r in records] == ["up", "down"]
    assert records[1]["original_answer"] == "blue moon"

    h = training_helpers
    root = tmp_path / "tiny"
    root.mkdir()
    vocab = h._tokenizer(root / "tokenizer")
    model = h._model(root / "llama", "llama", vocab, root / "tokenizer")
    args = h.train_args(
        {"llama": model, "train": served.feedback},
        "llama",
        tmp_path / "ckpt",
        batch_size=2,
        total_steps=2,
        checkpoint_steps=2,
        seq_length=16,
    )
    proc = h.run_train(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ckpt").is_dir() and any((tmp_path / "ckpt").iterdir())


@pytest.mark.parametrize("top_k", [0, 1, 5, 10_000])
def test_sampling_settings_give_an_answer(served, client, top_k):
    """Sampled with top_k 0 (no filter, as in the bot), small and beyond the vocabulary, and a
    top_p: a well-formed answer each time."""
    out = ask(
        client,
        "Hello",
        max_tokens=6,
        temperature=0.9,
        top_p=0.9,
        seed=1,
        extra_body={"top_k": top_k},
    )
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 6
