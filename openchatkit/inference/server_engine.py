"""Generation backends of the server: prompt token ids in, answer token ids out, many requests at
once.

A backend has `name`, `start()`, `stop()` and `stream(prompt_ids, params)`, an async iterator of
new token ids that ends at EOS or `params.max_tokens`; closing the iterator early (a stop string,
a client that went away) cancels the request. The torch backend batches with transformers'
continuous batching manager (`model.init_continuous_batching()`, what `transformers serve
--continuous-batching` runs): a new request joins the running batch at the next step, long
prompts are prefilled in chunks between decode steps, and KV blocks of a shared prompt prefix
(a conversation's next turn) are reused. The llama.cpp backend (server_llamacpp.py) has the same
interface and runs its blocking loop in a thread.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import os
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from openchatkit.inference.generation import GenerationSettings


@dataclass
class SamplingParams:
    """One request's decoding settings, as the backend needs them."""

    max_tokens: int
    greedy: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_settings(cls, s: GenerationSettings, eos: Iterable[int]) -> SamplingParams:
        return cls(
            max_tokens=s.max_tokens,
            greedy=s.greedy,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
            eos_token_ids=tuple(eos),
        )


def fast_greedy_rows(processors) -> None:
    """Give the manager's per-request logits processors (temperature, top-k, top-p: each a
    pass over the vocabulary, top-k and top-p a full sort of it, then the manager's softmax and
    multinomial) a short way for greedy requests, on a CPU, where that work costs as much as a
    quarter of a decode step of a 135M model at 8 requests.

    - Every row greedy (top-k 1, as TorchBackend.stream sends greedy requests): no processor
      runs and the sampler takes the argmax (`_sample` below).
    - Mixed: greedy rows become their argmax alone (0 there, -inf elsewhere: softmax and
      multinomial pick it for certain, as top-k 1 would); only sampling rows go through the
      processors, skipping a top-k or top-p none of them uses (k = vocabulary, p = 1).
    The same tokens either way (tests/serve/test_serve_sampling.py). Not on a GPU: there the
    step may be a captured CUDA graph, where a Python branch would be frozen.
    """
    from transformers.generation.continuous_batching import model_runner
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )

    if type(processors) is not ContinuousBatchingLogitsProcessorList:
        return
    processors.__class__ = _fast_greedy_class()
    processors.all_greedy = False
    runner = model_runner.ModelRunner
    if not getattr(runner._sample, "_openchatkit", False):
        plain = runner._sample

        def _sample(self, scores, output_ids):
            if getattr(self.logit_processor, "all_greedy", False) and not self.return_logprobs:
                tokens = scores[0].argmax(dim=-1)  # scores [1, rows, vocab] -> [rows]
                output_ids[0, : tokens.size(0)].copy_(tokens)
                return
            plain(self, scores, output_ids)

        _sample._openchatkit = True
        runner._sample = _sample


@functools.cache
def _fast_greedy_class():
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
        ContinuousBatchingLogitsProcessorList,
        ContinuousBatchingTopKLogitsWarper,
        ContinuousBatchingTopPLogitsWarper,
    )

    class FastGreedyRows(ContinuousBatchingLogitsProcessorList):
        all_greedy = False

        def __call__(self, input_ids, scores, args):
            self.all_greedy = False
            kinds = list(self.logits_processor)
            if not kinds or not all(
                isinstance(p, ContinuousBatchingLogitsProcessor) for p in kinds
            ):
                return super().__call__(input_ids, scores, args)  # a processor we do not know
            rows = scores.size(0)
            args = args[:, :rows]
            where = [
                i for i, p in enumerate(kinds) if isinstance(p, ContinuousBatchingTopKLogitsWarper)
            ]
            if not where:
                return super().__call__(input_ids, scores, args)
            greedy = args[where[0]] == 1
            if bool(greedy.all()):
                self.all_greedy = True
                return scores
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, scores.argmax(dim=-1, keepdim=True), 0.0)
            sample = (~greedy).nonzero().flatten()
            sub, sub_args = scores[sample], args[:, sample]
            for i, p in enumerate(kinds):
                arg = sub_args[i]
                if isinstance(p, ContinuousBatchingTopKLogitsWarper):
                    if bool((arg >= scores.size(1)).all()):
                        continue
                if isinstance(p, ContinuousBatchingTopPLogitsWarper):
                    if bool((arg.view(torch.float32) >= 1.0).all()):
                        continue
                sub = p(sub, arg)
            out[sample] = sub
            return out

    return FastGreedyRows


GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


class GqaSwitch:
    """transformers' switch for grouped-query attention inside SDPA (`enable_gqa`), on while a
    torch backend runs on a CPU.

    Without it transformers copies each KV head for every query head sharing it (`repeat_kv`)
    whenever an attention mask is given, as the manager's batches always have: at every layer of
    every step. On a CPU those copies took 17 ms of a decode step of the embedded model at 8
    requests; with the switch, same tokens and a median +6 % (1.05-1.17x) over packed linear
    layers alone in fp32, +1 % in bf16 (benchmarks/RESULTS.md, 2026-12-07 fourth session). The
    variable is read at every attention call, so it covers the process (the server's moderator
    model too); it is counted so that backends started and stopped in any order leave it as it
    was before the first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._before: str | None = None

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                self._before = os.environ.get(GQA_ENV)
                os.environ[GQA_ENV] = "1"
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                if self._before is None:
                    os.environ.pop(GQA_ENV, None)
                else:
                    os.environ[GQA_ENV] = self._before


GQA_SWITCH = GqaSwitch()


class TorchBackend:
    """transformers' continuous batching manager on the chat model (CPU or one GPU).

    max_batch: requests decoded together (more wait in the manager's queue for a slot); the
    server bounds how many are in flight in all.
    """

    name = "torch"

    def __init__(
        self,
        model,
        context_window: int,
        max_batch: int = 8,
        kv_tokens: int = 8192,
        max_batch_tokens: int = 256,
        page_size: int = 32,
    ):
        self.model = model
        self.context_window = context_window
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.kv_tokens = kv_tokens
        self.page_size = page_size
        self.manager = None
        self.in_flight = 0
        self._ids = itertools.count()
        self._gqa = False  # holds GQA_SWITCH

    def start(self) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # Sampling processors exist only for settings that differ from the neutral value when
        # the manager is built; per-request values then override them (greedy = top_k 1).
        gen = GenerationConfig(
            do_sample=True,
            temperature=0.7,
            top_k=50,
            top_p=0.95,
            max_new_tokens=16,
            eos_token_id=-1,
        )
        # KV memory, in page_size-token blocks shared by all requests (and by the prompt
        # prefixes they have in common): kv_tokens in all, at least one full window.
        pages = math.ceil(
            max(self.kv_tokens, self.context_window + self.page_size) / self.page_size
        )
        cb = ContinuousBatchingConfig(
            page_size=self.page_size,
            num_blocks=pages,
            max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=self.max_batch,
            per_request_processors=True,
        )
        self.manager = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=cb
        )
        on_cpu = self.model.device.type == "cpu"
        if on_cpu:
            fast_greedy_rows(self.manager.logit_processor)
        self.manager.start()
        if on_cpu:
            GQA_SWITCH.acquire()
            self._gqa = True

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True, timeout=30)
            self.manager = None
        if self._gqa:
            GQA_SWITCH.release()
            self._gqa = False

    def _top_k(self, top_k: int) -> int:
        """top_k 0 means no top-k filter (the bot's meaning): every token of the vocabulary."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0) or 1 << 30
        return vocab if top_k <= 0 else min(int(top_k), vocab)

    @property
    def healthy(self) -> bool:
        return self.manager is not None and self.manager.is_running()

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """New token ids of one request as the batch produces them (EOS not yielded)."""
        if not self.healthy:
            raise RuntimeError("the generation loop is not running")
        self.in_flight += 1
        request_id = f"req-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        kwargs = {
            "temperature": float(params.temperature) if not params.greedy else 1.0,
            "top_k": 1 if params.greedy else self._top_k(params.top_k),
            "top_p": float(params.top_p),
        }
        eos = set(params.eos_token_ids)
        finished = False
        try:
            self.manager.register_result_handler(request_id, outputs.put_nowait)
            self.manager.add_request(
                list(prompt_ids),
                request_id=request_id,
                max_new_tokens=params.max_tokens,
                streaming=True,
                eos_token_id=sorted(eos) or -1,
                **kwargs,
            )
            seen = 0
            while not finished:
                out = await outputs.get()
                if out.error:
                    raise RuntimeError(f"generation failed: {out.error}")
                finished = out.is_finished()
                tokens = out.generated_tokens
                for token in tokens[seen:]:
                    if token in eos:
                        finished = True
                        return
                    yield token
                seen = len(tokens)
        finally:
            self.in_flight -= 1
            if not finished and self.manager is not None:
                self.manager.cancel_request(request_id)  # frees its batch slot and KV blocks
                with self.manager.output_router._lock:  # a cancelled request never finishes
                    self.manager.output_router.result_handlers.pop(request_id, None)
