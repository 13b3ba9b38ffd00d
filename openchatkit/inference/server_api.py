"""OpenAI's chat completions protocol for the server: request checking, error bodies, and the
response and stream-chunk shapes (https://platform.openai.com/docs/api-reference/chat).

Everything here is pure: no model, no web framework, so each rule is testable alone. A request
that asks for something the server does not do (n > 1, tools, logprobs, ...) is refused with a
400 that names the parameter, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

# Accepted and ignored: they change nothing in the answer (accounting, tracing, caching hints).
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# Accepted: what the server does.
SUPPORTED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",  # vLLM's and llama.cpp's extension
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "parallel_tool_calls",
    "response_format",
}
# Refused whenever present with a value that asks for something (see check_unsupported).
UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "top_logprobs": "log probabilities",
    "logit_bias": "logit_bias",
    "audio": "audio output",
    "modalities": "modalities other than text",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning effort",
    "verbosity": "verbosity",
}
ROLES = {"system", "developer", "user", "assistant"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            503: "server_overloaded",
        }.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A checked chat completions request."""

    model: str | None
    system: str | None  # the system/developer messages joined
    history: list[dict]  # user/assistant messages before the last user message
    user: str  # the last user message
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise bad(f"'{key}' must be {kind}", key)
    if not lo <= value <= hi:
        raise bad(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(
                    f"messages[{i}].content: only text parts are supported",
                    f"messages[{i}].content",
                )
            if not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: a text part needs 'text'", f"messages[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content")


def check_unsupported(body: dict) -> None:
    for key, what in UNSUPPORTED.items():
        if body.get(key) not in (None, [], {}, "none", "auto"):
            raise bad(f"'{key}' is not supported: this server does not do {what}", key)
    for key in body:
        if key not in SUPPORTED and key not in IGNORED and key not in UNSUPPORTED:
            raise bad(f"unrecognized request argument supplied: {key}", key)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise bad("'n' must be a positive integer", "n")
    if n is not None and n > 1:
        raise bad("'n' > 1 is not supported: one choice per request", "n")
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported", "logprobs")
    if body.get("parallel_tool_calls"):
        raise bad("'parallel_tool_calls' is not supported: no tool calling", "parallel_tool_calls")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise bad(f"'{key}' is not supported (only 0)", key)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("'response_format' other than text is not supported", "response_format")


def parse_chat_request(body: object, max_tokens_cap: int) -> ChatRequest:
    """Check a decoded JSON body; APIError(400) names what is wrong."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    system_parts, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(
                f"messages[{i}] must be an object with role system, user or assistant",
                f"messages[{i}].role",
            )
        if m.get("tool_calls") or m.get("role") == "tool":
            raise bad("tool messages are not supported", f"messages[{i}]")
        text = _content(m, i)
        if m["role"] in ("system", "developer"):
            system_parts.append(text)
        else:
            turns.append({"role": m["role"], "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise bad("the last message must be from the user", "messages")
    limit = body.get("max_completion_tokens")
    key = "max_completion_tokens"
    if limit is None:
        key = "max_tokens"
    max_tokens = _number(body, key, 1, max_tokens_cap, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise bad("'stream_options' supports include_usage only", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    return ChatRequest(
        model=model,
        system="\n\n".join(system_parts) or None,
        history=turns[:-1],
        user=turns[-1]["content"],
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 1e-9, 1),
        top_k=_number(body, "top_k", 0, 1_000_000, integer=True),
        stop=[s for s in stop if s],
        seed=_number(body, "seed", -(2**63), 2**63 - 1, integer=True),
        stream=stream,
        include_usage=include_usage,
    )


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    cid: str, model: str, content: str, finish_reason: str, use: dict, extra: dict
) -> dict:
    """A non-streamed answer; `extra` (sources, moderation, stats) under "openchatkit"."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": use,
        "system_fingerprint": None,
        "openchatkit": extra,
    }


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, **more) -> dict:
    """One streamed chunk (object chat.completion.chunk)."""
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        "system_fingerprint": None,
    }
    out.update(more)
    return out
