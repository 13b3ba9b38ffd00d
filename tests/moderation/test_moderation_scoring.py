"""Moderator scoring on a tiny random llama: equal to a direct log-likelihood computation,
batched equal to one at a time, with and without the few-shot prefix cache."""

from __future__ import annotations

import pytest
import torch

from openchatkit.errors import UserError
from openchatkit.inference.moderator import Moderator
from openchatkit.moderation import (
    LABELS,
    build_prompt,
    normalise_label,
    parse_labelled,
)

TEXTS = [
    "Can you help me plan a picnic?",
    "I am so angry at my boss today.",
    "x",
    "What is 2 plus 2? Please answer quickly, I have a test tomorrow morning.",
    "My neighbour keeps parking in my spot.",
]


def direct_scores(model, tokenizer, text: str) -> torch.Tensor:
    """Sum of log p(label tokens | prompt) from one plain forward pass per label."""
    prompt = tokenizer(build_prompt(text), add_special_tokens=True)["input_ids"]
    out = []
    for label in LABELS:
        cont = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float()[0], dim=-1)
        out.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_probabilities_equal_direct_log_likelihood(tiny_llama, char_tokenizer, prefix_cache):
    mod = Moderator(tiny_llama, char_tokenizer, device="cpu")
    mod.use_prefix_cache = prefix_cache
    for text in TEXTS[:3]:
        label, probs = mod.classify(text)
        want = torch.softmax(direct_scores(tiny_llama, char_tokenizer, text), dim=0)
        got = torch.tensor([probs[lab] for lab in LABELS], dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-5), (text, got, want)
        assert label == LABELS[int(want.argmax())]
        assert abs(sum(probs.values()) - 1.0) < 1e-9


def test_batched_equals_one_at_a_time(tiny_llama, char_tokenizer):
    mod = Moderator(tiny_llama, char_tokenizer, device="cpu", batch_size=3)
    batched = mod.log_likelihoods(TEXTS)
    assert batched.shape == (len(TEXTS), len(LABELS))
    single = torch.cat([mod.log_likelihoods([t]) for t in TEXTS])
    assert torch.allclose(batched, single, atol=1e-4)
    results = mod.classify_many(TEXTS)
    assert [r.label for r in results] == [mod.classify(t)[0] for t in TEXTS]


def test_custom_examples_change_the_prompt(tiny_llama, char_tokenizer):
    one = Moderator(tiny_llama, char_tokenizer, examples=[("Hi there", "casual")])
    none = Moderator(tiny_llama, char_tokenizer, examples=[])
    assert len(none.prefix_ids) < len(one.prefix_ids)
    assert not torch.allclose(one.log_likelihoods(["Hello"]), none.log_likelihoods(["Hello"]))


def test_long_text_is_cut_to_the_window(char_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(char_tokenizer), window=400)
    mod = Moderator(model, char_tokenizer, examples=[("Hi", "casual")], context_window=400)
    label, _ = mod.classify("word " * 500)
    assert label in LABELS


def test_bad_inputs(tiny_llama, char_tokenizer):
    mod = Moderator(tiny_llama, char_tokenizer)
    with pytest.raises(UserError, match="empty"):
        mod.classify("   ")
    with pytest.raises(UserError, match="cannot encode"):
        Moderator(tiny_llama, char_tokenizer, examples=[("caf\u00e9 \u2603", "casual")])
    with pytest.raises(UserError, match="does not fit"):
        Moderator(tiny_llama, char_tokenizer, context_window=64)


def test_record_schemas():
    assert parse_labelled({"text": "hi", "label": "casual"}) == ("hi", "casual")
    assert parse_labelled({"text": "x", "labels": "needs caution | hate"}) == (
        "x",
        "needs caution",
    )
    assert parse_labelled({"text": "Input: yo\nOutput: __needs_intervention__"}) == (
        "yo",
        "needs intervention",
    )
    assert "not one of" in parse_labelled({"text": "x", "label": "spicy"})
    assert "no `label`" in parse_labelled({"text": "x"})
    assert "text" in parse_labelled({"label": "casual"})
    assert normalise_label(["sexual content", "Probably Needs Caution"]) == "probably needs caution"
