"""The llama.cpp backend of the chat bot: a GGUF model run by llama.cpp behind the same chat session
(openchatkit/inference/session.py) and decode loop (generation.py) as the torch backend.

Only the forward pass moves to llama.cpp: the session still renders prompts, counts tokens, picks
each next token from the logits (`pick_next_token`, so greedy and seeded sampling are the same
code on both backends), streams, stops on text and is interrupted the same way. The binding is
llama-cpp-python's ctypes layer (`llama_cpp.llama_cpp`), used directly: its high-level `Llama`
class copies every step's logits into a history array and re-checks its own prompt cache, work
this loop does not need.

The conversation's KV cache is kept between turns: a new prompt is compared with the tokens
already in the cache, the cache is cut back to the common prefix and only the rest is evaluated,
so turn 10 costs about what turn 1 does (benchmarks/bench_bot.py measures it).

The tokenizer is llama.cpp's own (`LlamaCppTokenizer`, from the file's metadata), with the
chat template rendered by Jinja as transformers renders it: any GGUF file chats without an HF
folder beside it, and transformers, which cannot read every architecture's GGUF (GPT-NeoX), is
not needed.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openchatkit.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the quantiser's child process needs none
    import torch

# ggml log levels: 4 = error. Lower levels (model metadata dumps) are dropped.
_LOG_ERROR = 4
_log_callback = None  # kept referenced: llama.cpp holds the raw pointer


def load_binding():
    """llama-cpp-python's ctypes layer (`llama_cpp.llama_cpp`), loaded once with its CPU backend
    and llama.cpp's log filtered to errors; UserError when it is missing or does not load."""
    try:
        import llama_cpp.llama_cpp as L
    except ImportError as err:
        raise UserError(
            "--backend llama.cpp needs the llama-cpp-python binding: run `make install` "
            f"(see README, 'GGUF and llama.cpp') ({err})"
        ) from None
    except (OSError, RuntimeError) as err:  # the shared library failed to load
        raise UserError(f"the llama.cpp binding is installed but does not load: {err}") from None
    global _log_callback
    if _log_callback is None:

        def drop_below_errors(level, text, user_data):
            if level == _LOG_ERROR and text:
                os.write(2, text)

        _log_callback = L.llama_log_callback(drop_below_errors)
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _load_cpu_backend(Path(L._base_path))  # the folder libllama was loaded from
        L.llama_backend_init()
    return L


def _load_cpu_backend(lib_dir: Path) -> None:
    """Load ggml's CPU backend when the binding was built with dynamic backends.

    `make install` builds llama.cpp with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS: one CPU
    backend module per x86-64 feature level (libggml-cpu-haswell.so, -icelake, -zen4, ...), and
    ggml picks the best this CPU runs. They lie in the binding's own lib folder, which ggml does
    not search by itself: left alone, llama_backend_init would look beside the Python executable
    and in the working directory, so a library planted in the folder a user chats from would run.
    A binding built the other way has its CPU backend linked in (registered at load): no-op.
    """
    # The libggml libllama loaded, found by its soname. Not the wheel's libggml.so (what
    # `llama_cpp._ggml` opens): a separate copy of libggml.so.0 (wheels hold no symlinks), whose
    # backend registry libllama never sees.
    lib = ctypes.CDLL("libggml.so.0")
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    if lib.ggml_backend_reg_count() > 0:
        return
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load_all_from_path(str(lib_dir).encode())
    if lib.ggml_backend_reg_count() == 0:
        raise UserError(
            f"the llama.cpp binding has no CPU backend this CPU can run in {lib_dir} "
            "(reinstall it: `make install`)"
        )


def cpu_backend_variant() -> str | None:
    """The CPU backend module this process loaded ('zen4', 'haswell', ...), None when the CPU
    backend is linked into libggml (a binding built without dynamic backends). Linux only."""
    load_binding()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libggml-cpu-") and name.endswith(".so"):
            return name[len("libggml-cpu-") : -len(".so")]
    return None


def default_threads() -> int:
    """OMP_NUM_THREADS when set (the thread budget the user gives torch), else the CPUs this
    process may run on (llama.cpp's own default counts every core)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def quantize_file(src: Path, dst: Path, ftype: str, threads: int | None = None) -> None:
    """Quantise GGUF file `src` into `dst` with llama.cpp's own quantiser (`llama_model_quantize`,
    what its `llama-quantize` tool runs), in this process. `ftype` names one of its file types
    (`Q4_K_M`: the LLAMA_FTYPE_MOSTLY_ suffix). Its k-quant mixtures keep the tensors that cost
    most when quantised (attention values, some feed-forward down projections, the output) at
    more bits. Tensor by tensor, memory-mapped: peak memory about one tensor. When it fails,
    llama.cpp has written its reason to stderr, and RuntimeError is raised.

    Ctrl-C cannot stop it: llama.cpp calls back into Python for each log line, and ctypes drops
    a KeyboardInterrupt raised there. The exporter runs it in a child process it can kill
    (openchatkit/export/gguf_quantize.py)."""
    L = load_binding()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads or default_threads()
    rc = L.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantiser failed (error {rc})")


def _meta(L, model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):  # a long chat template: ask again with room for it
        buf = ctypes.create_string_buffer(n + 1)
        L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace")


class LlamaCppModel:
    """A GGUF model loaded in llama.cpp with one conversation's KV cache.

    `generate_ids` is the backend interface generation.py's decode loop calls.
    """

    generation_config = None  # the session asks for eos ids here and on the tokenizer

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
    ):
        L = self.L = load_binding()
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--model {path}: no such GGUF file")
        params = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise UserError(f"--model {path}: llama.cpp cannot load this GGUF file")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        train_ctx = int(L.llama_model_n_ctx_train(self.model))
        # The KV cache is allocated whole: at most 8192 positions unless asked (SmolLM2: 8192).
        self.n_ctx = int(n_ctx or min(train_ctx, 8192))
        self.n_batch = n_batch
        threads = n_threads or default_threads()
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            self.model = None  # close() (from __del__) must not free it again
            raise UserError(f"--model {path}: llama.cpp cannot make a context of {self.n_ctx}")
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.cached: list[int] = []  # tokens whose keys and values are in the cache, in order
        self.path = path
        self.threads = threads
        self.file_type = _meta(L, self.model, "general.file_type")
        self.chat_template = _meta(L, self.model, "tokenizer.chat_template")
        self.name = _meta(L, self.model, "general.name") or path.stem

    def free_context(self) -> None:
        """Free the single-sequence context and its batch, keeping the weights (the server makes
        its own context with several sequences on the same model)."""
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        self.free_context()
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- evaluation -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache (after an interrupted step, whose state is unknown)."""
        self.L.llama_memory_clear(self.memory, True)
        self.cached = []

    def _decode(self, tokens: list[int]) -> None:
        """Evaluate `tokens` after the cached ones; logits of the last one only."""
        b, start = self.batch, len(self.cached)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[len(tokens) - 1] = 1
        b.n_tokens = len(tokens)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            self.reset()
            raise RuntimeError(f"llama_decode failed ({rc}): context of {self.n_ctx} full?")
        self.cached.extend(tokens)

    def logits(self) -> torch.Tensor:
        """The last evaluated position's logits (vocab,), a view valid until the next step."""
        import torch

        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))

    def evaluate(self, ids: list[int]) -> int:
        """Bring the cache to `ids` (re-using the common prefix); returns how many tokens were
        evaluated. The last token is always evaluated: its logits give the next token."""
        if len(ids) > self.n_ctx:
            raise UserError(f"prompt of {len(ids)} tokens exceeds the {self.n_ctx}-token context")
        from openchatkit.inference.generation import common_prefix

        keep = min(common_prefix(self.cached, ids), len(ids) - 1)
        if keep < len(self.cached):
            if not self.L.llama_memory_seq_rm(self.memory, -1, keep, -1):
                self.reset()
                keep = 0
            del self.cached[keep:]
        rest = ids[keep:]
        for i in range(0, len(rest), self.n_batch):
            self._decode(rest[i : i + self.n_batch])
        return len(rest)

    def generate_ids(
        self,
        input_ids: torch.Tensor,
        settings,
        eos_token_ids: Iterable[int],
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield new token ids until EOS (not yielded) or settings.max_tokens; as
        generation.generate_token_ids does for a torch model."""
        from openchatkit.inference.generation import pick_next_token

        eos = set(eos_token_ids)
        try:
            self.last_evaluated = self.evaluate(input_ids[0].tolist())
            for step in range(settings.max_tokens):
                token = pick_next_token(self.logits(), settings, generator)
                if token in eos:
                    return
                yield token
                if step + 1 == settings.max_tokens:
                    return
                self._decode([token])
        except GeneratorExit:  # the consumer stopped (stop string): the cache is consistent
            raise
        except BaseException:  # Ctrl-C may land between a step and its bookkeeping
            self.reset()
            raise


class LlamaCppTokenizer:
    """The part of an HF tokenizer's interface the chat session uses, on llama.cpp's own
    tokenizer: `__call__`/`encode`, `decode`, `apply_chat_template`, `chat_template`,
    `eos_token_id`. Special tokens written in text (`<|im_start|>`) are parsed as such, as HF
    tokenizers do."""

    def __init__(self, cpp: LlamaCppModel):
        self.cpp, self.L, self.vocab = cpp, cpp.L, cpp.vocab
        self.chat_template = cpp.chat_template
        L = self.L
        ids = {int(L.llama_vocab_eos(self.vocab)), int(L.llama_vocab_eot(self.vocab))}
        self.eos_token_id = sorted(i for i in ids if i >= 0)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.bos_token = self._text(int(L.llama_vocab_bos(self.vocab)))
        self.eos_token = self._text(int(L.llama_vocab_eos(self.vocab)))

    def _text(self, token: int) -> str:
        return self._piece(token, True).decode("utf-8", "replace") if token >= 0 else ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (ctypes.c_int32 * n_max)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special_tokens, True)
        if n < 0:
            buf = (ctypes.c_int32 * -n)()
            n = self.L.llama_tokenize(
                self.vocab, data, len(data), buf, -n, add_special_tokens, True
            )
        return list(buf[:n])

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors=None, **_):
        ids = self.encode(text, add_special_tokens)
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}

    def _piece(self, token: int, special: bool) -> bytes:
        key = (token, special)
        if key not in self._pieces:
            buf = ctypes.create_string_buffer(64)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            self._pieces[key] = buf.raw[:n]
        return self._pieces[key]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_) -> str:
        data = b"".join(self._piece(int(t), not skip_special_tokens) for t in ids)
        return data.decode("utf-8", "replace")

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False, **_
    ) -> Any:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ValueError("this GGUF file has no chat template")

        def raise_exception(message):
            raise ValueError(message)

        # As transformers renders chat templates: trimmed blocks, sandboxed.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        return self.encode(text, False) if tokenize else text


def describe_file_type(code: str | None) -> str:
    """general.file_type number -> a short name (gguf.LlamaFileType)."""
    try:
        import gguf

        return gguf.LlamaFileType(int(code)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "GGUF"
