"""The server's llama.cpp backend: GGUF models decoded as parallel sequences, as `llama-server`
does, behind the same interface as the torch backend (openchatkit/inference/server_engine.py):
`name`, `start()`, `stop()`, `healthy` and `stream(prompt_ids, params)`.

One llama.cpp context holds `max_batch` sequences (slots), each with its own `window` KV cells
(llama.cpp's non-unified KV cache: attention of a sequence reads only its own cells). A worker
thread runs the loop: at each step it builds ONE `llama_batch` holding the next token of every
answer being generated (one seq_id each, logits on) and, in the room left (`n_batch` tokens in
all), chunks of the prompts still to evaluate; one `llama_decode` call then advances all of them.
A new request therefore joins at the next step, a long prompt is prefilled in chunks between
decode steps, and a client that reads slowly does not slow the others (tokens are queued to it).

Prefix (prompt) cache: a slot keeps the tokens whose keys and values it holds after its request
ends. A new request takes the free slot whose cached tokens share the longest prefix with its
prompt (a conversation's next turn finds its previous turn there), the slot's cache is cut back
to that prefix and only the rest of the prompt is evaluated.

The next token is picked by `pick_next_token` (openchatkit/inference/generation.py) from the
logits llama.cpp returns, so greedy and seeded sampling are the bot's own code on both backends.
ctypes releases the GIL during `llama_decode`, so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import torch

from openchatkit.inference.generation import GenerationSettings, common_prefix, pick_next_token
from openchatkit.inference.server_engine import SamplingParams

log = logging.getLogger("openchatkit.server")


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    settings: GenerationSettings
    eos: frozenset[int]
    emit: object  # callable(item), thread-safe: hands ("token", id) / ("end",) / ("error", msg)
    generator: torch.Generator | None = None
    slot: _Slot | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens not evaluated yet
    next_token: int | None = None  # generated, shown, not yet evaluated
    generated: int = 0
    cancelled: bool = False  # set by the event loop when the client is gone


@dataclass(eq=False)
class _Slot:
    seq: int  # the llama.cpp sequence id
    cached: list[int] = field(default_factory=list)  # tokens in this sequence's KV, in order
    request: _Request | None = None
    last_used: float = 0.0


class LlamaCppBackend:
    """Parallel sequences of one GGUF model (`LlamaCppModel` of openchatkit/inference/llamacpp.py).

    window: KV cells (= the longest prompt + answer) of each sequence; max_batch: sequences
    decoded together (more requests wait for a free one); n_batch: tokens per llama_decode call.
    """

    name = "llama.cpp"

    def __init__(
        self,
        cpp,
        window: int,
        max_batch: int = 8,
        n_batch: int = 256,
        threads: int | None = None,
    ):
        self.cpp = cpp
        self.L = cpp.L
        self.window = int(window)
        self.max_batch = int(max_batch)
        self.n_batch = int(n_batch)
        self.threads = int(threads or cpp.threads)
        self.ctx = None
        self.batch = None
        self.slots: list[_Slot] = []
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Prompt tokens evaluated and taken from a slot's cache, over all requests.
        self.prompt_evaluated = 0
        self.prompt_reused = 0
        self.steps = 0  # llama_decode calls
        self.in_flight = 0  # streams open

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        L = self.L
        params = L.llama_context_default_params()
        params.n_seq_max = self.max_batch
        params.n_ctx = self.window * self.max_batch  # split evenly between the sequences
        params.kv_unified = False
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.threads
        self.ctx = L.llama_init_from_model(self.cpp.model, params)
        if not self.ctx:
            raise RuntimeError(
                f"llama.cpp cannot make a context of {self.max_batch} x {self.window} tokens"
            )
        per_seq = L.llama_n_ctx(self.ctx) // self.max_batch
        if per_seq < self.window:
            raise RuntimeError(f"llama.cpp gave {per_seq} tokens per sequence, not {self.window}")
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.vocab_size = self.cpp.n_vocab
        self.slots = [_Slot(seq) for seq in range(self.max_batch)]
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llama.cpp-batch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (requests still running get an error) and free the context."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        if self.ctx is not None:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = self.batch = None

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- the event loop's side --------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """New token ids of one request as the batch produces them (EOS not yielded); closing
        the iterator early frees its sequence at the next step."""
        if not self.healthy:
            raise RuntimeError("the generation loop is not running")
        if not prompt_ids or len(prompt_ids) + params.max_tokens > self.window:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens + {params.max_tokens} new ones does not "
                f"fit the {self.window}-token window"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        settings = GenerationSettings(
            max_tokens=params.max_tokens,
            sample=not params.greedy,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
        )
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator().manual_seed(params.seed)
        req = _Request(list(prompt_ids), settings, frozenset(params.eos_token_ids), emit, generator)
        with self._cond:
            self._pending.append(req)
            self._cond.notify_all()
        self.in_flight += 1
        try:
            while True:
                item = await queue.get()
                if item[0] == "token":
                    yield item[1]
                elif item[0] == "end":
                    return
                else:
                    raise RuntimeError(item[1])
        finally:
            self.in_flight -= 1
            req.cancelled = True  # a no-op once it ended; else the loop drops it next step
            with self._cond:
                self._cond.notify_all()

    # ---- the worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._pending and not self._busy():
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit()
                if any(s.request is not None for s in self.slots):
                    self._step()
        except BaseException as exc:  # never leave a client waiting on a dead loop
            log.exception("llama.cpp batch loop failed")
            self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
            raise
        self._fail_all("the server is shutting down")

    def _busy(self) -> bool:
        return any(s.request is not None for s in self.slots)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._pending = self._pending, []
        for req in waiting + [s.request for s in self.slots if s.request is not None]:
            self._finish(req, ("error", message))

    def _finish(self, req: _Request, item: tuple) -> None:
        if req.slot is not None:
            req.slot.request = None
            req.slot.last_used = time.monotonic()
            req.slot = None
        if not req.cancelled:
            try:
                req.emit(item)
            except RuntimeError:  # the client's event loop is closed
                pass

    def _admit(self) -> None:
        """Give waiting requests free slots (called with the lock held); drop cancelled ones."""
        self._pending = [r for r in self._pending if not r.cancelled]
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot.request, ("end",))
        while self._pending:
            free = [s for s in self.slots if s.request is None]
            if not free:
                return
            req = self._pending.pop(0)
            slot = self._pick(free, req.prompt)
            keep = min(common_prefix(slot.cached, req.prompt), len(req.prompt) - 1)
            if keep < len(slot.cached):
                if not self.L.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
                    self.L.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
                    keep = 0
                del slot.cached[keep:]
            req.todo = req.prompt[keep:]
            self.prompt_reused += keep
            self.prompt_evaluated += len(req.todo)
            slot.request, req.slot = req, slot

    @staticmethod
    def _pick(free: list[_Slot], prompt: list[int]) -> _Slot:
        """The free slot with the longest cached prefix of `prompt`, if that prefix is most
        (80 %) of what the slot holds: a conversation's earlier turn, whose answer may end in
        a few tokens the next prompt writes differently. Else the least recently used slot, so
        that a prompt sharing only a system prompt keeps off another conversation's cache
        (llama-server's "slot prompt similarity", there 50 %, too low for short chats)."""
        shared = {id(s): common_prefix(s.cached, prompt) for s in free}
        fits = [s for s in free if s.cached and 5 * shared[id(s)] >= 4 * len(s.cached)]
        if fits:
            return max(fits, key=lambda s: (shared[id(s)], -s.last_used))
        return min(free, key=lambda s: s.last_used)

    def _step(self) -> None:
        """One llama_decode: every generating sequence's next token, then prompt chunks."""
        L, b = self.L, self.batch
        n = 0
        wants: list[tuple[_Request, int]] = []  # (request, batch row whose logits it needs)
        fed: list[tuple[_Request, list[int], bool]] = []  # (request, tokens, from its prompt)

        def put(slot: _Slot, token: int, offset: int, logits: bool) -> None:
            nonlocal n
            b.token[n] = token
            b.pos[n] = len(slot.cached) + offset
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = slot.seq
            b.logits[n] = logits
            n += 1

        active = [s.request for s in self.slots if s.request is not None]
        for req in active:
            if req.next_token is not None:
                put(req.slot, req.next_token, 0, True)
                wants.append((req, n - 1))
                fed.append((req, [req.next_token], False))
        # Prompts in admission order of their slots; each gets what room is left.
        for req in active:
            room = self.n_batch - n
            if not req.todo or room <= 0:
                continue
            part = req.todo[:room]
            last = len(part) == len(req.todo)
            for j, token in enumerate(part):
                put(req.slot, token, j, last and j == len(part) - 1)
            if last:
                wants.append((req, n - 1))
            fed.append((req, part, True))
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        self.steps += 1
        if rc != 0:  # the sequences' state is unknown: forget them and fail their requests
            for req, _, _ in fed:
                L.llama_memory_seq_rm(self.memory, req.slot.seq, -1, -1)
                req.slot.cached = []
                self._finish(req, ("error", f"llama_decode failed ({rc})"))
            return
        for req, tokens, prompt in fed:
            req.slot.cached.extend(tokens)
            if prompt:
                del req.todo[: len(tokens)]
            else:
                req.next_token = None
        for req, row in wants:
            ptr = L.llama_get_logits_ith(self.ctx, row)
            logits = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)))
            token = pick_next_token(logits, req.settings, req.generator)
            if token in req.eos:
                self._finish(req, ("end",))
                continue
            req.generated += 1
            if not req.cancelled:
                req.emit(("token", token))
            if req.generated >= req.settings.max_tokens:
                self._finish(req, ("end",))
            else:
                req.next_token = token


def load_llamacpp_for_server(model: str | None, window: int):
    """(LoadedModel, window) for `serve.py --backend llama.cpp`: the GGUF file (or the embedded
    model's) as the bot loads it, its window `window` tokens at most (its training window)."""
    from openchatkit.inference.backends import load_llamacpp_chat_model

    loaded = load_llamacpp_chat_model(model, n_ctx=window)
    cpp = loaded.model
    train = int(cpp.L.llama_model_n_ctx_train(cpp.model)) or window
    loaded.context_window = min(window, train)
    cpp.free_context()  # the server's context (LlamaCppBackend.start) has several sequences
    return loaded
