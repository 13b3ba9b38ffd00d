"""Fixtures for the server tests: a tiny random Llama with a character tokenizer (OpenChatKit's
`<human>:`/`<bot>:` format), served on 127.0.0.1 by uvicorn in a thread of the test process, with
a scripted moderator and retriever; and the same model saved as a folder for `inference/serve.py`
run as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import string
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
CHARS = string.ascii_letters + string.digits + " \n.,:;!?<>/'-_()[]|"
WINDOW = 256


# Prompts of different lengths for the concurrency tests of both backends.
CONCURRENT_TEXTS = [
    "hi",
    "Tell me about the sea and the moon.",
    "bees",
    "a b c d e f g",
    "Why?" * 9,
]


def answers_at_once(backend, prompts: list[list[int]], params) -> list[list[int]]:
    """Every prompt streamed through a started backend at the same time; each answer's ids."""

    async def answer(ids):
        return [t async for t in backend.stream(ids, params)]

    async def all_at_once():
        return await asyncio.gather(*(answer(ids) for ids in prompts))

    return asyncio.run(all_at_once())


def make_char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny_chat_model(folder: Path) -> Path:
    """A 2-layer random Llama over the character tokenizer, as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=WINDOW,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights: varied, non-degenerate random text
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("serve") / "tiny-chat")


class ScriptedModerator:
    """Flags any text containing one of `flag` (as the user's turn or the answer)."""

    name = "scripted"

    def __init__(self):
        self.flag = {"FLAGGED"}
        self.flag_answers = False
        self.seen: list[str] = []

    def classify(self, text: str):
        self.seen.append(text)
        hit = any(s in text for s in self.flag) or (self.flag_answers and "USERTURN" not in text)
        label = "needs intervention" if hit else "casual"
        probs = {"casual": 0.0, "needs intervention": 0.0}
        probs[label] = 0.99
        return label, probs


class ScriptedRetriever:
    """Returns one fixed passage for a question that mentions Paris, none otherwise."""

    def __init__(self):
        self.hit = SimpleNamespace(
            text="Paris is the capital of France.", title="Paris", source="wiki/Paris", score=0.9
        )

    def search(self, text: str, k: int = 3):
        return [self.hit] if "Paris" in text else []

    def __len__(self):
        return 1


class RecordingBackend:
    """Wraps a backend: records each prompt; `gate` (an Event) holds generation until set."""

    def __init__(self, inner, tokenizer):
        self.inner = inner
        self.tokenizer = tokenizer
        self.name = inner.name
        self.prompts: list[str] = []
        self.gate: threading.Event | None = None
        self.delay = 0.0  # seconds per token: a slow model
        self.cancelled = 0  # streams closed by the server before their end

    def start(self):
        self.inner.start()

    def stop(self):
        self.inner.stop()

    @property
    def healthy(self):
        return self.inner.healthy

    async def stream(self, prompt_ids, params):
        import asyncio

        self.prompts.append(self.tokenizer.decode(prompt_ids))
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.05)
        try:
            async with contextlib.aclosing(self.inner.stream(prompt_ids, params)) as tokens:
                async for t in tokens:
                    yield t
                    await asyncio.sleep(self.delay)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return free_port()


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def build_service(folder: Path, **config):
    """(ChatService, RecordingBackend, moderator, retriever) over the tiny model."""
    from openchatkit.inference.backends import load_torch_chat_model
    from openchatkit.inference.generation import GenerationSettings
    from openchatkit.inference.server import ChatService, ServerConfig
    from openchatkit.inference.server_engine import TorchBackend

    # serve.py's loader: on an x86-64 CPU, the model with packed linear layers.
    loaded = load_torch_chat_model(str(folder), device="cpu", dtype="float32")
    moderator, retriever = ScriptedModerator(), ScriptedRetriever()
    backend = RecordingBackend(
        TorchBackend(loaded.model, loaded.context_window, max_batch=4, kv_tokens=2048),
        loaded.tokenizer,
    )
    config.setdefault("defaults", GenerationSettings(max_tokens=8, sample=False))
    config.setdefault("max_tokens_cap", 64)
    service = ChatService(
        loaded, backend, ServerConfig(**config), retriever=retriever, moderator=moderator
    )
    # Moderation and retrieval are on only where a test turns them on.
    service.moderator_ref, service.retriever_ref = moderator, retriever
    service.moderator = service.retriever = None
    return service, backend, moderator, retriever


@pytest.fixture(scope="module")
def served(tiny_chat_dir, tmp_path_factory):
    """A running server: SimpleNamespace(url, service, backend, moderator, retriever, feedback)."""
    from openchatkit.inference.server_app import create_app

    feedback = tmp_path_factory.mktemp("fb") / "feedback.jsonl"
    service, backend, moderator, retriever = build_service(
        tiny_chat_dir, feedback=str(feedback), max_body_bytes=20_000, max_in_flight=6
    )
    with ServerThread(create_app(service)) as server:
        yield SimpleNamespace(
            url=server.url,
            service=service,
            backend=backend,
            moderator=moderator,
            retriever=retriever,
            feedback=feedback,
        )


@pytest.fixture(scope="session")
def training_helpers():
    """tests/training/conftest.py as a module: its tiny trainer models and run helpers."""
    path = REPO / "tests" / "training" / "conftest.py"
    spec = importlib.util.spec_from_file_location("training_conftest_for_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def server_kit():
    """The helpers above for tests that start their own server."""
    return SimpleNamespace(
        build_service=build_service,
        ServerThread=ServerThread,
        RecordingBackend=RecordingBackend,
        ScriptedModerator=ScriptedModerator,
        ScriptedRetriever=ScriptedRetriever,
    )
