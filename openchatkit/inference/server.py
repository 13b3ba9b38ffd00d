"""An OpenAI-compatible chat server over the kit's chat session (`inference/serve.py`).

Routes: POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
GET /health, POST /v1/feedback (the page's thumbs and corrections), GET / (the chat page).

Each request is a turn of `ChatSession` (openchatkit/inference/session.py): the same chat format,
history fitting, moderation of the message and of the answer (the bot's refusal, finish_reason
`content_filter`) and retrieval (passages in this turn's prompt, their sources under
`openchatkit.sources` in the response) as the REPL, through `ChatSession.plan_turn`. Only the
decoding differs: a backend (openchatkit/inference/server_engine.py) batches the requests.

Errors use OpenAI's shape with the right status (400, 401, 404, 413, 503 with Retry-After);
an unexpected failure is a 500 with a one-line message, the traceback goes to the server log.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from openchatkit.inference.generation import (
    GenerationSettings,
    GenerationStats,
    IncrementalDecoder,
    StopStringBuffer,
)
from openchatkit.inference.server_api import (
    APIError,
    ChatRequest,
    bad,
    chunk,
    completion,
    completion_id,
    usage,
)
from openchatkit.inference.server_engine import SamplingParams
from openchatkit.inference.server_feedback import FeedbackLog
from openchatkit.inference.session import ChatSession, TurnPlan
from openchatkit.moderation import REFUSAL

log = logging.getLogger("openchatkit.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_tokens_cap: int = 1024  # the most new tokens one request may ask for
    max_in_flight: int = 64  # requests generating or waiting; more get 503
    retrieval_k: int = 3
    moderation_threshold: float | None = None
    feedback: str | None = None
    defaults: GenerationSettings = field(default_factory=GenerationSettings)


def default_settings(model_defaults: dict, max_tokens: int) -> GenerationSettings:
    """Decoding when a request sets nothing: the model's generation_config.json (as the bot
    reads it), else the bot's defaults."""
    base = GenerationSettings(max_tokens=max_tokens)
    for key, name in (("do_sample", "sample"), ("temperature", "temperature"), ("top_k", "top_k")):
        if key in model_defaults:
            setattr(base, name, type(getattr(base, name))(model_defaults[key]))
    if "top_p" in model_defaults:
        base.top_p = float(model_defaults["top_p"])
    return base


class ChatService:
    """The model, its helpers and the per-request logic, apart from the web framework."""

    def __init__(self, loaded, backend, config: ServerConfig, retriever=None, moderator=None):
        self.loaded = loaded
        self.backend = backend
        self.config = config
        self.retriever = retriever
        self.moderator = moderator
        self.in_flight = 0
        # The moderator and the retriever run one call at a time, in a worker thread, so the
        # event loop keeps streaming other answers meanwhile.
        self._aux_lock = threading.Lock()
        probe = self.new_session(config.defaults, None)
        self.format = probe.format
        self.eos = probe.eos_token_ids()
        self.feedback = (
            FeedbackLog(config.feedback, self.format, loaded.name) if config.feedback else None
        )

    @property
    def model_name(self) -> str:
        return self.loaded.name

    def new_session(self, settings: GenerationSettings, system: str | None) -> ChatSession:
        return ChatSession(
            self.loaded,
            settings,
            system=system,
            stream=False,
            out=io.StringIO(),
            err=io.StringIO(),
            retriever=self.retriever,
            retrieval_k=self.config.retrieval_k,
            moderator=self.moderator,
            moderation_threshold=self.config.moderation_threshold,
        )

    def settings_for(self, req: ChatRequest) -> GenerationSettings:
        d = self.config.defaults
        s = GenerationSettings(**d.as_dict())
        s.max_tokens = req.max_tokens or min(d.max_tokens, self.config.max_tokens_cap)
        if req.temperature is not None:
            s.sample, s.temperature = req.temperature > 0, req.temperature
        if req.top_p is not None:
            s.top_p = req.top_p
        if req.top_k is not None:
            s.top_k = req.top_k
        if req.seed is not None:
            s.seed = req.seed
        return s

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, "default"):
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    async def plan(self, req: ChatRequest) -> tuple[ChatSession, TurnPlan]:
        settings = self.settings_for(req)
        if settings.max_tokens >= self.loaded.context_window:
            raise bad(
                f"max_tokens {settings.max_tokens} must be below the model's "
                f"{self.loaded.context_window}-token window",
                "max_tokens",
            )
        session = self.new_session(settings, req.system)
        session.messages = list(req.history)

        def work():
            with self._aux_lock:
                plan = session.plan_turn(req.user)
                if plan.prompt and not plan.refused and not plan.too_long:
                    # Tokenized here, in this worker thread, not on the event loop that
                    # streams the other answers.
                    tok = self.loaded.tokenizer
                    plan.prompt_ids = tok(plan.prompt, add_special_tokens=False)["input_ids"]
                return plan

        plan = await asyncio.to_thread(work)
        if plan.too_long:
            raise APIError(
                400,
                f"{plan.too_long}: the prompt is {plan.prompt_tokens} tokens and max_tokens is "
                f"{settings.max_tokens}, but the model's window is {self.loaded.context_window} "
                f"tokens (at most {plan.budget} prompt tokens with this max_tokens)",
                param="messages",
                code="context_length_exceeded",
            )
        return session, plan

    async def review(self, session: ChatSession, answer: str) -> str:
        def work():
            with self._aux_lock:
                return session.review_answer(answer)

        return await asyncio.to_thread(work)

    async def pieces(
        self, session: ChatSession, plan: TurnPlan, stop: list[str], stats: GenerationStats
    ) -> AsyncIterator[str]:
        """The answer's text as it is generated, as the REPL shows it: no leading whitespace,
        trailing whitespace only once text follows it, never part of a stop string."""
        tok = self.loaded.tokenizer
        ids = getattr(plan, "prompt_ids", None)
        if ids is None:
            ids = tok(plan.prompt, add_special_tokens=False)["input_ids"]
        params = SamplingParams.from_settings(session.settings, self.eos)
        stats.prompt_tokens = len(ids)
        decoder = IncrementalDecoder(tok)
        stops = StopStringBuffer([*session.format.stop_strings, *stop])
        started, held, shown = time.perf_counter(), "", False
        stats.stop_reason = "eos"
        try:
            async with contextlib.aclosing(self.backend.stream(ids, params)) as tokens:
                async for token in tokens:
                    if stats.generated_tokens == 0:
                        stats.first_token_s = time.perf_counter() - started
                    stats.generated_tokens += 1
                    piece = stops.push(decoder.push(token))
                    if stops.stopped:
                        stats.stop_reason = "stop_string"
                    elif stats.generated_tokens >= params.max_tokens:
                        stats.stop_reason = "max_tokens"
                    if not shown:
                        piece = piece.lstrip()
                    body = piece.rstrip()
                    if body:
                        yield held + body
                        shown, held = True, piece[len(body) :]
                    else:
                        held += piece
                    if stops.stopped:
                        return
            tail = stops.flush().rstrip()
            if tail and (shown or tail.lstrip()):
                yield held + tail if shown else tail.lstrip()
        finally:
            stats.total_s = time.perf_counter() - started

    def extra(self, session: ChatSession, plan: TurnPlan, stats: GenerationStats | None) -> dict:
        """What the response carries beyond OpenAI's fields, under "openchatkit"."""
        out: dict = {
            "sources": [
                {
                    "index": i,
                    "title": getattr(h, "title", "") or "",
                    "source": getattr(h, "source", "") or "",
                    "score": round(float(getattr(h, "score", 0.0)), 4),
                    "text": getattr(h, "text", ""),
                }
                for i, h in enumerate(plan.hits, start=1)
            ],
            "moderation": list(session.moderation_notes) if session.moderation_on else [],
            "refused": plan.refused,
            "dropped_turns": plan.dropped,
        }
        if stats is not None:
            out["stats"] = {
                "prompt_tokens": stats.prompt_tokens,
                "generated_tokens": stats.generated_tokens,
                "first_token_s": round(stats.first_token_s, 4),
                "total_s": round(stats.total_s, 4),
                "tokens_per_s": round(stats.tokens_per_s, 2),
                "stop_reason": stats.stop_reason,
            }
        return out

    @contextlib.contextmanager
    def admitted(self):
        if self.in_flight >= self.config.max_in_flight:
            raise APIError(
                503,
                f"the server is busy ({self.in_flight} requests in flight); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def finish_reason(stats: GenerationStats) -> str:
    return "length" if stats.stop_reason == "max_tokens" else "stop"


async def answer_whole(service: ChatService, req: ChatRequest, session, plan) -> dict:
    """A non-streamed answer (also what a moderated streamed answer is built from)."""
    cid = completion_id()
    if plan.refused:
        extra = service.extra(session, plan, None)
        return completion(cid, service.model_name, REFUSAL, "content_filter", usage(0, 0), extra)
    stats = GenerationStats()
    text = "".join([p async for p in service.pieces(session, plan, req.stop, stats)])
    reason = finish_reason(stats)
    if session.moderator is not None and session.moderation_on:
        reviewed = await service.review(session, text)
        if reviewed == REFUSAL and text != REFUSAL:
            text, reason = REFUSAL, "content_filter"
    use = usage(stats.prompt_tokens, stats.generated_tokens)
    extra = service.extra(session, plan, stats)
    return completion(cid, service.model_name, text, reason, use, extra)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def answer_stream(
    service: ChatService, req: ChatRequest, session, plan
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A moderated
    answer is reviewed whole before it is sent, as the REPL does."""
    cid, name = completion_id(), service.model_name
    yield sse(chunk(cid, name, {"role": "assistant", "content": ""}))
    moderated = session.moderator is not None and session.moderation_on
    if plan.refused or moderated:
        whole = await answer_whole(service, req, session, plan)
        choice = whole["choices"][0]
        yield sse(chunk(cid, name, {"content": choice["message"]["content"]}))
        yield sse(chunk(cid, name, {}, choice["finish_reason"], openchatkit=whole["openchatkit"]))
        use = whole["usage"]
    else:
        stats = GenerationStats()
        async for piece in service.pieces(session, plan, req.stop, stats):
            yield sse(chunk(cid, name, {"content": piece}))
        extra = service.extra(session, plan, stats)
        yield sse(chunk(cid, name, {}, finish_reason(stats), openchatkit=extra))
        use = usage(stats.prompt_tokens, stats.generated_tokens)
    if req.include_usage:
        out = chunk(cid, name, {}, usage=use)
        out["choices"] = []
        yield sse(out)
    yield sse("[DONE]")
