"""The torch backend's short way for greedy rows through transformers' per-request logits
processors (openchatkit/inference/server_engine.py fast_greedy_rows): greedy rows become their
argmax alone, sampling rows get exactly what the processors give them, in a mixed batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def processors(temperature=0.7, top_k=50, top_p=0.95):
    """The manager's processor list as TorchBackend.start builds it (per-request versions)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )
    )  # fmt: skip
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    return ContinuousBatchingLogitsProcessorList(
        model._get_logits_processor(gen), per_request_processors=True
    )


class Row:
    """What prepare_tensor_args reads of a request."""

    def __init__(self, **kwargs):
        self.has_new_token = True
        self.state = type("S", (), {"logit_processor_kwargs": kwargs})()


def run(lists, rows, scores):
    out = []
    for lp in lists:
        storage = torch.zeros(lp.tensors_required, 16, dtype=torch.int32)
        lp.fill_defaults(storage)
        args = lp.prepare_tensor_args(rows, storage)
        out.append(lp(None, scores.clone(), args))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_batch_same_as_the_processors(seed):
    from openchatkit.inference.server_engine import fast_greedy_rows

    plain, fast = processors(), processors()
    fast_greedy_rows(fast)
    assert type(fast).__name__ == "FastGreedyRows"
    torch.manual_seed(seed)
    scores = torch.randn(5, 64) * 3
    rows = [
        Row(temperature=1.0, top_k=1, top_p=1.0),  # greedy, as TorchBackend.stream sends it
        Row(temperature=0.8, top_k=64, top_p=0.9),  # samples: top-k the whole vocabulary
        Row(temperature=1.0, top_k=1, top_p=1.0),
        Row(temperature=1.3, top_k=5, top_p=1.0),
        Row(temperature=0.5, top_k=64, top_p=1.0),  # nothing to filter
    ]
    want, got = run([plain, fast], rows, scores)
    assert not fast.all_greedy  # the sampler samples
    for r in (0, 2):  # greedy: the argmax alone survives, as top-k 1 leaves it
        assert torch.equal(torch.isfinite(got[r]), torch.isfinite(want[r]))
        assert int(got[r].argmax()) == int(scores[r].argmax())
        assert torch.isfinite(got[r]).sum() == 1
    for r in (1, 3, 4):
        assert torch.allclose(got[r], want[r], equal_nan=True), r
    # The manager's sampler: softmax then multinomial; greedy rows are certain.
    probs = torch.softmax(got, dim=-1)
    assert probs[0].max() == 1.0 and probs[2].max() == 1.0


def test_all_greedy_skips_the_processors(monkeypatch):
    from transformers.generation.continuous_batching import cb_logits_processors as cb

    from openchatkit.inference.server_engine import fast_greedy_rows

    fast = processors()
    fast_greedy_rows(fast)

    def boom(*a, **k):
        raise AssertionError("a processor ran for greedy rows")

    for cls in (
        cb.ContinuousBatchingTopKLogitsWarper,
        cb.ContinuousBatchingTopPLogitsWarper,
        cb.ContinuousBatchingTemperatureLogitsWarper,
    ):
        monkeypatch.setattr(cls, "__call__", boom)
    scores = torch.randn(3, 64)
    (got,) = run([fast], [Row(temperature=1.0, top_k=1, top_p=1.0)] * 3, scores)
    assert fast.all_greedy and torch.equal(got, scores)
    # The manager's sampler then takes the argmax, without softmax or multinomial.
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    monkeypatch.setattr(torch, "multinomial", boom)
    runner = SimpleNamespace(logit_processor=fast, return_logprobs=False, do_sample=True)
    output_ids = torch.full((2, 8), -1, dtype=torch.int32)
    ModelRunner._sample(runner, got[None], output_ids)
    assert output_ids[0, :3].tolist() == scores.argmax(dim=-1).tolist()


def test_sampling_rows_still_sample(monkeypatch):
    """A batch with a sampling row goes through the manager's own softmax and multinomial."""
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    from openchatkit.inference.server_engine import fast_greedy_rows

    fast = processors()
    fast_greedy_rows(fast)
    scores = torch.randn(2, 64)
    rows = [Row(temperature=1.0, top_k=1, top_p=1.0), Row(temperature=1.0, top_k=64, top_p=1.0)]
    (got,) = run([fast], rows, scores)
    calls = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(1) or real(*a, **k))
    runner = SimpleNamespace(logit_processor=fast, return_logprobs=False, do_sample=True)
    output_ids = torch.full((2, 8), -1, dtype=torch.int32)
    ModelRunner._sample(runner, got[None], output_ids)
    assert calls and output_ids[0, 0] == int(scores[0].argmax())
