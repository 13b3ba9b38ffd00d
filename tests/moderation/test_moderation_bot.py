"""The bot with a moderation model: real tiny llamas fine-tuned here on one-label sets (plain
torch, a few dozen Adam steps), a real tiny chat model whose forward calls are counted."""

from __future__ import annotations

import io

import pytest
import torch

from openchatkit.inference.generation import GenerationSettings
from openchatkit.inference.moderator import Moderator
from openchatkit.inference.session import ChatSession
from openchatkit.models.loading import LoadedModel
from openchatkit.moderation import CAUTION_INSTRUCTION, REFUSAL, build_prompt

TRAIN_TEXTS = ["hello there", "what time is it", "tell me a story", "I like cats", "go away"]


def fine_tune(model, tokenizer, pairs, steps=40, lr=3e-3):
    """Teach `model` the label of each (text, label), loss on the label tokens only."""
    rows, masks = [], []
    for text, label in pairs:
        prompt = tokenizer(build_prompt(text, examples=()))["input_ids"]
        cont = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        rows.append(prompt + cont)
        masks.append([0] * len(prompt) + [1] * len(cont))
    width = max(map(len, rows))
    ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])
    labels = torch.tensor(
        [
            [t if m else -100 for t, m in zip(r, k, strict=True)] + [-100] * (width - len(r))
            for r, k in zip(rows, masks, strict=True)
        ]
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def moderators(char_tokenizer, make_tiny_llama):
    """label -> a Moderator whose model was fine-tuned to answer that label for any text."""
    out = {}
    for seed, label in enumerate(["needs intervention", "needs caution", "casual"], start=1):
        model = make_tiny_llama(len(char_tokenizer), seed=seed)
        fine_tune(model, char_tokenizer, [(t, label) for t in TRAIN_TEXTS])
        out[label] = Moderator(model, char_tokenizer, examples=(), name=label)
    return out


class Recorder:
    """Counts the chat model's forward calls, and keeps each turn's whole prompt as the session
    hands it to the model's backend (`watch`): with the cross-turn KV cache the forward itself
    sees only the tokens the cache lacks."""

    def __init__(self, model, tokenizer):
        self.calls, self.prompts, self.tokenizer = 0, [], tokenizer
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1

    def watch(self, chat_model):
        inner = chat_model.generate_ids

        def generate_ids(input_ids, *args, **kwargs):
            self.prompts.append(self.tokenizer.decode(input_ids[0].tolist()))
            return inner(input_ids, *args, **kwargs)

        chat_model.generate_ids = generate_ids


@pytest.fixture
def chat(char_tokenizer, make_tiny_llama):
    def make(moderator, system=None, max_tokens=4, threshold=None):
        model = make_tiny_llama(len(char_tokenizer), seed=99)
        recorder = Recorder(model, char_tokenizer)
        loaded = LoadedModel(model, char_tokenizer, "tiny-chat", "cpu", "float32", 1024)
        out, err = io.StringIO(), io.StringIO()
        session = ChatSession(
            loaded,
            GenerationSettings(sample=False, max_tokens=max_tokens),
            system=system,
            out=out,
            err=err,
            moderator=moderator,
            moderation_threshold=threshold,
        )
        recorder.watch(session.chat_model)
        return session, recorder, out, err

    return make


def test_the_fine_tuned_moderators_prefer_their_label(moderators):
    for label, moderator in moderators.items():
        got, probs = moderator.classify("a message it never saw")
        assert got == label and probs[label] > 0.5, (label, probs)


def test_refusal_without_calling_the_chat_model(moderators, chat):
    session, recorder, out, err = chat(moderators["needs intervention"])
    assert session.handle_line("a message it never saw")
    assert out.getvalue() == REFUSAL + "\n"
    assert recorder.calls == 0 and session.messages == []
    assert "moderation: user needs intervention" in err.getvalue()
    assert "chat model not called" in err.getvalue()
    # /moderation off: the same message reaches the chat model and is kept.
    session.handle_line("/moderation off")
    session.handle_line("a message it never saw")
    assert recorder.calls > 0 and len(session.messages) == 2
    # A threshold the probability does not reach: answered, with the caution note.
    session.handle_line("/moderation on")
    session.moderation_threshold = 1.0
    session.handle_line("another message")
    assert len(session.messages) == 4 and CAUTION_INSTRUCTION in recorder.prompts[-1]


def test_caution_changes_only_that_turns_system_prompt(moderators, chat):
    session, recorder, out, err = chat(moderators["needs caution"], system="Be brief.")
    session.handle_line("first message")
    first = recorder.prompts[-1]
    assert first.startswith("Be brief.\n\n" + CAUTION_INSTRUCTION + "\n<human>: first message")
    assert "moderation: user needs caution" in err.getvalue()
    session.moderator = moderators["casual"]
    session.handle_line("second message")
    second = recorder.prompts[-1]
    assert CAUTION_INSTRUCTION not in second and second.startswith("Be brief.\n<human>: first")
    assert session.system == "Be brief." and session.messages[0]["content"] == "first message"
    assert "moderation: user casual" in err.getvalue()


def test_flagged_answer_is_replaced(char_tokenizer, make_tiny_llama, chat):
    # What the chat model answers (greedy), then a moderator that flags that answer only.
    session, _, out, _ = chat(None, max_tokens=8)
    answer = session.say("hi")
    assert answer
    model = make_tiny_llama(len(char_tokenizer), seed=7)
    pairs = [("hi", "casual"), (answer, "needs intervention")] * 2
    moderator = Moderator(fine_tune(model, char_tokenizer, pairs, steps=150), char_tokenizer, ())
    assert moderator.classify("hi")[0] == "casual"
    assert moderator.classify(answer)[0] == "needs intervention"
    session, recorder, out, err = chat(moderator, max_tokens=8)
    session.handle_line("hi")
    assert recorder.calls > 0 and out.getvalue() == REFUSAL + "\n"
    assert answer not in out.getvalue() and session.messages == []
    assert "user casual" in err.getvalue() and "bot needs intervention" in err.getvalue()


def test_moderation_command_without_a_model(chat):
    session, _, _, err = chat(None)
    session.handle_line("/moderation on")
    assert "--moderation MODEL" in err.getvalue()
