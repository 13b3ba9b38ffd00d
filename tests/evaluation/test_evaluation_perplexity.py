"""Perplexity equals a direct fp64 computation and lm-eval's own loglikelihood_rolling."""

from __future__ import annotations

import json
import math
import re

import torch

from openchatkit.evaluation.perplexity import (
    ScoredText,
    perplexity,
    read_records,
    render_records,
)


def direct_fp64(model, tokenizer, text: str) -> tuple[float, int]:
    """Sum of log p(token | BOS, earlier tokens) in float64, one forward pass over the record."""
    import copy

    double = copy.deepcopy(model).double()
    ids = tokenizer.encode(text)
    inp = torch.tensor([[tokenizer.bos_token_id] + ids[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(double(inp).logits[0].double(), dim=-1)
    return float(logprobs.gather(-1, torch.tensor(ids)[:, None]).sum()), len(ids)


def test_perplexity_equals_direct_fp64(tiny_loaded, eval_texts):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    short = [t for t in eval_texts if len(tok.encode(t)) <= model.config.max_position_embeddings]
    assert len(short) >= 10
    result = perplexity(model, tok, [ScoredText(t) for t in short], batch_size=5, progress=False)
    direct = [direct_fp64(model, tok, t) for t in short]
    for ours, (ref, _) in zip(result.per_record, direct, strict=True):
        assert math.isclose(ours, ref, rel_tol=1e-6), (ours, ref)
    ll = sum(r for r, _ in direct)
    tokens = sum(n for _, n in direct)
    nbytes = sum(len(t.encode()) for t in short)
    words = sum(len(re.split(r"\s+", t)) for t in short)
    metrics = result.metrics()
    expected = {
        "token_perplexity": math.exp(-ll / tokens),
        "bits_per_byte": -ll / nbytes / math.log(2),
        "byte_perplexity": math.exp(-ll / nbytes),
        "word_perplexity": math.exp(-ll / words),
    }
    for name, value in expected.items():
        assert math.isclose(metrics[name], value, rel_tol=1e-6), (name, metrics[name], value)
    assert metrics["tokens"] == tokens and metrics["bytes"] == nbytes and metrics["n"] == len(short)


def test_perplexity_equals_lm_eval_loglikelihood_rolling(tiny_loaded, eval_texts):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    # The long record needs several 64-token windows: the rolling part is exercised too.
    assert len(tok.encode(eval_texts[-1])) > 3 * model.config.max_position_embeddings
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    requests = [
        Instance("loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in eval_texts
    ]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = perplexity(
        model, tok, [ScoredText(t) for t in eval_texts], batch_size=3, progress=False
    ).per_record
    for a, b in zip(ours, theirs, strict=True):
        assert math.isclose(a, b, rel_tol=1e-6), (a, b)


def test_loss_on_bot_scores_only_answers(tiny_loaded, sample_file):
    tok = tiny_loaded.tokenizer
    records = read_records([sample_file])[:6]
    full = perplexity(tiny_loaded.model, tok, render_records(records, tok, "all"), progress=False)
    bot = perplexity(tiny_loaded.model, tok, render_records(records, tok, "bot"), progress=False)
    assert 0 < bot.tokens < full.tokens and 0 < bot.bytes < full.bytes
    # Each record's bot log-likelihood is a part of (never more negative than) the full one.
    for b, f in zip(bot.per_record, full.per_record, strict=True):
        assert f < b < 0


def test_read_records_counts_bad_lines(tmp_path):
    import pytest

    from openchatkit.errors import UserError

    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"text": "<human>: hi\n<bot>: hello"}) + "\nnot json\n" + '{"x": 1}\n'
    )
    with pytest.raises(UserError, match=r"2 malformed line\(s\) \(first: line 2"):
        read_records([path])


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_messages_records_scored_as_the_chat_template_renders_them(tiny_loaded, tmp_path):
    """`messages` records: scored on the tokenizer's chat template rendering (what the trainer
    trains on), equal to the same conversation given as a rendered `text`; under --loss-on bot
    only the assistant turns count. A tokenizer without a template is a one-line error."""
    import copy

    import pytest

    from openchatkit.errors import UserError

    chats = [
        [
            {"role": "user", "content": f"what is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "you are welcome"},
        ]
        for i in range(4)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    records = read_records([path])
    with pytest.raises(UserError, match="no chat template"):
        render_records(records, tiny_loaded.tokenizer, "all")
    tok = copy.deepcopy(tiny_loaded.tokenizer)
    tok.chat_template = TEMPLATE
    rendered = render_records(records, tok, "all")
    texts = [tok.apply_chat_template(c, tokenize=False) for c in chats]
    assert [r.text for r in rendered] == texts and "<|assistant|>2 plus 2 is 4." in texts[2]
    model = tiny_loaded.model
    ours = perplexity(model, tok, rendered, progress=False).per_record
    plain = perplexity(model, tok, [ScoredText(t) for t in texts], progress=False).per_record
    assert ours == pytest.approx(plain, rel=1e-9)
    bot = perplexity(model, tok, render_records(records, tok, "bot"), progress=False)
    assert all(f < b < 0 for b, f in zip(bot.per_record, ours, strict=True))
