"""Token generation for the chat bot: a KV-cached decode loop that streams text.

Why not `model.generate` with a streamer: the bot needs to stop on text (`<human>:`) without ever
printing part of it, to be interrupted by Ctrl-C between tokens with the partial answer kept, and
to time the first token. A plain loop over the model's forward with its KV cache does all of that
with less per-token overhead than `generate` (benchmarks/bench_bot.py measures both).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class GenerationSettings:
    """User-tunable decoding settings (the bot's `/set` names)."""

    max_tokens: int = 128
    sample: bool = True
    temperature: float = 0.6
    top_k: int = 40
    top_p: float = 1.0
    seed: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def greedy(self) -> bool:
        return not self.sample or self.temperature <= 0


def parse_on_off(value: str) -> bool:
    """on/off (true/false, yes/no, 1/0) as a bool; ValueError otherwise."""
    v = value.lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise ValueError("expected on or off")


def parse_seed(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def checked(parse, ok, why):
    """`parse` followed by a range check: ValueError(`why`) when `ok(value)` is false."""

    def convert(value: str):
        v = parse(value)
        if not ok(v):
            raise ValueError(why)
        return v

    return convert


# GenerationSettings field -> parser of its text (the bot's /set NAME VALUE, a saved chat's
# settings); each raises ValueError with the reason.
SETTERS = {
    "temperature": checked(float, lambda v: 0 <= v < math.inf, "must be >= 0 and finite"),
    "top_k": checked(int, lambda v: v >= 0, "must be >= 0 (0 turns it off)"),
    "top_p": checked(float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "max_tokens": checked(int, lambda v: v >= 1, "must be >= 1"),
    "sample": parse_on_off,
    "seed": parse_seed,
}


@dataclass
class GenerationStats:
    """What one answer cost: token counts and times in seconds."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""  # "eos" | "stop_string" | "max_tokens" | "interrupted"
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


def pick_next_token(
    logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None
) -> int:
    """Choose the next token from last-position logits (vocab,): argmax, or sample with
    temperature, top-k and top-p (nucleus) filtering, in that order as HF does."""
    if settings.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / settings.temperature
    if 0 < settings.top_k < logits.numel():
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass before them already reaches top_p (always keep the first).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= settings.top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_token_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    settings: GenerationSettings,
    eos_token_ids: Iterable[int],
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until EOS (not yielded) or `settings.max_tokens`.

    input_ids: (1, prompt_len) on the model's device. The loop keeps the model's KV cache between
    steps and asks for last-position logits only, so the prompt costs one forward pass.
    `model` may also be a backend object with this method as `generate_ids`
    (`TorchChatModel` below, `openchatkit.inference.llamacpp.LlamaCppModel`).
    """
    if hasattr(model, "generate_ids"):  # a backend: llama.cpp, or a torch model with its cache
        yield from model.generate_ids(input_ids, settings, eos_token_ids, generator)
        return
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    yield from decode(model, out, settings, eos_token_ids, generator)


def decode(
    model: torch.nn.Module,
    out,
    settings: GenerationSettings,
    eos_token_ids: Iterable[int],
    generator: torch.Generator | None = None,
    on_fed: Callable[[int, Any], None] | None = None,
) -> Iterator[int]:
    """The decode loop after the prompt's forward `out` (logits of its last position, its KV
    cache): pick a token, stop at EOS (not yielded) or `settings.max_tokens`, feed it back with
    the cache. `on_fed(token, out)` runs once a yielded token is in the cache."""
    eos = set(eos_token_ids)
    device = out.logits.device
    for step in range(settings.max_tokens):
        token = pick_next_token(out.logits[0, -1], settings, generator)
        if token in eos:
            return
        yield token
        if step + 1 == settings.max_tokens:
            return
        next_ids = torch.tensor([[token]], device=device)
        out = model(
            input_ids=next_ids,
            past_key_values=out.past_key_values,
            use_cache=True,
            logits_to_keep=1,
        )
        if on_fed is not None:
            on_fed(token, out)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter
        if x != y:
            break
        n += 1
    return n


class TorchChatModel:
    """A torch causal LM that keeps the conversation's KV cache between answers.

    The next prompt usually extends the last one (history + answer + new message), so the cache
    is cut back to the tokens both share and only the rest is evaluated. Anything unexpected
    (an interrupted step, a cache without `crop`) drops the cache: the prompt is then evaluated
    whole, as without this class.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.past = None
        self.cached: list[int] = []  # tokens whose keys and values `past` holds
        self.last_evaluated = 0

    def reset(self) -> None:
        self.past, self.cached = None, []

    def _fed(self, token: int, out) -> None:
        self.past = out.past_key_values
        self.cached.append(token)

    @torch.inference_mode()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        settings: GenerationSettings,
        eos_token_ids: Iterable[int],
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        ids = input_ids[0].tolist()
        keep = min(common_prefix(self.cached, ids), len(ids) - 1)
        past = self.past
        if past is None or keep == 0 or not hasattr(past, "crop"):
            past, keep = None, 0
        elif keep < past.get_seq_length():
            # A negative count removes that many tokens from the end, in every transformers
            # version with `crop` (a positive one meant "keep this many", and now raises).
            past.crop(keep - past.get_seq_length())
        self.past, self.cached = None, []
        try:
            out = self.model(
                input_ids=input_ids[:, keep:],
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            self.past, self.cached = out.past_key_values, ids
            self.last_evaluated = len(ids) - keep
            yield from decode(self.model, out, settings, eos_token_ids, generator, on_fed=self._fed)
        except GeneratorExit:  # the consumer stopped (stop string): the cache is consistent
            raise
        except BaseException:  # Ctrl-C may land between a step and its bookkeeping
            self.reset()
            raise


def chat_backend(model, keep_cache: bool = False):
    """What the chat session generates with: a backend object as is (llama.cpp keeps its cache
    across turns); a torch model as is, or with `keep_cache` (the session's default) wrapped in
    `TorchChatModel`, so the next turn evaluates only its new tokens."""
    if hasattr(model, "generate_ids") or not keep_cache:
        return model
    return TorchChatModel(model)


class StopStringBuffer:
    """Hold back streamed text that could be the start of a stop string.

    `push` returns the text that is safe to show; when a stop string appears, everything before it
    is returned and `stopped` becomes True. `flush` returns what was held back at the end of a
    generation that stopped for another reason (the held text was real output after all).
    """

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = 0
        for s in self.stop_strings:
            # Longest suffix of pending that is a proper prefix of s.
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class IncrementalDecoder:
    """Turn a growing list of token ids into new text pieces.

    Decodes the whole answer each time (answers are short) so tokenizers that merge spaces or
    bytes across tokens stay correct; holds back a trailing U+FFFD, which means a multi-byte
    character is not complete yet.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def stream_text(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: torch.Tensor,
    settings: GenerationSettings,
    eos_token_ids: Iterable[int],
    stop_strings: Iterable[str] = (),
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yield answer text as it is generated: never part of a stop string, nothing after it.

    Fills `stats` as it goes; on KeyboardInterrupt the stats say "interrupted" and the exception
    propagates to the caller, which keeps what was shown.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(prompt_ids.shape[-1])
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(settings.seed)
    decoder = IncrementalDecoder(tokenizer)
    stops = StopStringBuffer(stop_strings)
    start = time.perf_counter()
    stats.stop_reason = "eos"
    try:
        for token in generate_token_ids(model, prompt_ids, settings, eos_token_ids, generator):
            if stats.generated_tokens == 0:
                stats.first_token_s = time.perf_counter() - start
            stats.generated_tokens += 1
            piece = stops.push(decoder.push(token))
            if piece:
                yield piece
            if stops.stopped:
                stats.stop_reason = "stop_string"
                return
            if stats.generated_tokens == settings.max_tokens:
                stats.stop_reason = "max_tokens"
        tail = stops.flush()
        if tail:
            yield tail
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
        raise
    finally:
        stats.total_s = time.perf_counter() - start
