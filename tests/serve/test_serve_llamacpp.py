"""The server on the llama.cpp backend (openchatkit/inference/server_llamacpp.py): a tiny random
Llama (the embedded model's tokenizer and chat template) exported to GGUF, served as parallel
sequences. Concurrent answers equal the single-sequence llama.cpp loop's, a conversation's next
turn evaluates only its new tokens, and the HTTP side (the `openai` client streamed and not,
errors, moderation refusal, disconnect) is the torch backend's, through the same server code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.serve.conftest import CONCURRENT_TEXTS, answers_at_once

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

from openchatkit.moderation import REFUSAL  # noqa: E402

WINDOW = 256
CHAT = "/v1/chat/completions"
SERVE = Path(__file__).resolve().parents[2] / "inference" / "serve.py"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-layer random Llama with peaked logits, exported in f32 (exact enough that batched
    and single-sequence greedy decoding pick the same tokens)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from openchatkit.export.gguf import export_gguf
    from openchatkit.models.embedded import ensure_embedded_model

    folder = tmp_path_factory.mktemp("cpp") / "tiny-llama"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=WINDOW,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_embedded_model()).save_pretrained(folder)
    return export_gguf(str(folder), folder.parent / "tiny.f32.gguf", "f32")


def make_backend(path, max_batch=3):
    from openchatkit.inference.server_llamacpp import LlamaCppBackend, load_llamacpp_for_server

    loaded = load_llamacpp_for_server(str(path), WINDOW)
    return loaded, LlamaCppBackend(loaded.model, loaded.context_window, max_batch, threads=1)


def prompt_ids(loaded, text: str) -> list[int]:
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
    return tok(prompt, add_special_tokens=False)["input_ids"]


def reference(path, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of the bot's single-sequence llama.cpp loop (LlamaCppModel)."""
    from openchatkit.inference.backends import load_llamacpp_chat_model
    from openchatkit.inference.generation import GenerationSettings

    cpp = load_llamacpp_chat_model(str(path), n_ctx=WINDOW, threads=1).model
    settings = GenerationSettings(max_tokens=max_tokens, sample=False)
    return list(cpp.generate_ids(torch.tensor([ids]), settings, []))


def test_concurrent_answers_equal_single_sequence_ones(tiny_gguf):
    """Five requests at once on three sequences (two wait for a free one), prompts of
    different lengths: each answer is the single-sequence loop's, token for token, and the
    answers shared llama_decode calls (fewer calls than tokens)."""
    from openchatkit.inference.server_engine import SamplingParams

    loaded, backend = make_backend(tiny_gguf)
    prompts = [prompt_ids(loaded, t) for t in CONCURRENT_TEXTS]
    params = SamplingParams(max_tokens=12, greedy=True)
    backend.start()
    try:
        got = answers_at_once(backend, prompts, params)
    finally:
        backend.stop()
    for ids, tokens in zip(prompts, got, strict=True):
        assert tokens == reference(tiny_gguf, ids, 12)
    assert all(len(t) == 12 for t in got)  # no EOS asked for: every answer runs to max_tokens
    assert backend.steps < sum(map(len, got))  # batched: several sequences per llama_decode


def test_next_turn_reuses_the_cached_prefix(tiny_gguf):
    """Turn 2 of a conversation (turn 1's prompt and answer, then a new message) evaluates only
    what turn 1 did not; an unrelated prompt meanwhile takes another sequence."""
    from openchatkit.inference.server_engine import SamplingParams

    loaded, backend = make_backend(tiny_gguf, max_batch=2)
    tok = loaded.tokenizer
    params = SamplingParams(max_tokens=6, greedy=True)

    async def answer(ids):
        return [t async for t in backend.stream(ids, params)]

    backend.start()
    try:
        first = prompt_ids(loaded, "What is in the sea?")
        answer1 = asyncio.run(answer(first))
        asyncio.run(answer(prompt_ids(loaded, "Something else entirely, please.")))
        history = [
            {"role": "user", "content": "What is in the sea?"},
            {"role": "assistant", "content": tok.decode(answer1)},
            {"role": "user", "content": "And in the sky?"},
        ]
        second = tok(tok.apply_chat_template(history, tokenize=False), add_special_tokens=False)
        second = second["input_ids"]
        before = backend.prompt_evaluated
        got = asyncio.run(answer(second))
    finally:
        backend.stop()
    from openchatkit.inference.generation import common_prefix

    # The cache holds turn 1's prompt and answer but the answer's last token (max_tokens was
    # reached: it was never fed back).
    shared = common_prefix(first + answer1[:-1], second)
    assert shared > len(first)  # the first answer is part of turn 2's prompt
    assert backend.prompt_evaluated - before == len(second) - shared
    assert got == reference(tiny_gguf, second, 6)


@pytest.fixture(scope="module")
def cpp_served(tiny_gguf, server_kit):
    """The server over the tiny GGUF on llama.cpp, in this process."""
    from openchatkit.inference.generation import GenerationSettings
    from openchatkit.inference.server import ChatService, ServerConfig
    from openchatkit.inference.server_app import create_app

    loaded, inner = make_backend(tiny_gguf)
    backend = server_kit.RecordingBackend(inner, loaded.tokenizer)
    moderator = server_kit.ScriptedModerator()
    config = ServerConfig(defaults=GenerationSettings(max_tokens=8, sample=False))
    config.max_tokens_cap, config.max_in_flight = 200, 8
    service = ChatService(loaded, backend, config, moderator=moderator)
    service.moderator = None  # on where a test turns it on
    with server_kit.ServerThread(create_app(service)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        yield server.url, service, backend, moderator, client, loaded


def test_openai_client_streamed_and_not(cpp_served, tiny_gguf):
    url, service, backend, _, client, loaded = cpp_served
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(
        model=service.model_name, messages=messages, max_tokens=10, temperature=0
    )
    text = whole.choices[0].message.content
    ids = prompt_ids(loaded, "Hello there")
    assert whole.usage.prompt_tokens == len(ids)
    assert backend.prompts[-1] == loaded.tokenizer.decode(ids)  # the chat template's prompt
    expected = reference(tiny_gguf, ids, 10)
    assert whole.usage.completion_tokens == len(expected)
    assert text == loaded.tokenizer.decode(expected).strip()
    assert whole.choices[0].finish_reason == ("length" if len(expected) == 10 else "stop")

    stream = client.chat.completions.create(
        model=service.model_name,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        whole.choices[0].finish_reason
    )
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["backend"] == "llama.cpp" and health["context_window"] == WINDOW


def test_errors_in_openai_shape(cpp_served):
    url, service, *_ = cpp_served
    long = {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 8}
    resp = httpx.post(url + CHAT, json=long, timeout=30)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert (
        err["code"] == "context_length_exceeded" and f"window is {WINDOW} tokens" in err["message"]
    )
    assert "431 tokens" in err["message"]  # both counts: the prompt and the window
    resp = httpx.post(url + CHAT, json={"messages": [], "max_tokens": 8}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    resp = httpx.post(url + CHAT, json={"model": "nope", "messages": [{"role": "user"}]})
    assert resp.status_code in (400, 404) and "error" in resp.json()
    resp = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "x"}], "n": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
    ok = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "x"}]}, timeout=60)
    assert ok.status_code == 200  # still serving


def test_moderation_refusal(cpp_served):
    _, service, backend, moderator, client, _ = cpp_served
    service.moderator = moderator
    try:
        sent = len(backend.prompts)
        refused = client.chat.completions.create(
            model=service.model_name,
            messages=[{"role": "user", "content": "FLAGGED words"}],
            max_tokens=8,
        )
        assert refused.choices[0].finish_reason == "content_filter"
        assert refused.choices[0].message.content == REFUSAL
        assert len(backend.prompts) == sent  # nothing was generated for it
        stream = client.chat.completions.create(
            model=service.model_name,
            messages=[{"role": "user", "content": "FLAGGED again"}],
            stream=True,
        )
        chunks = [c for c in stream if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == REFUSAL
        assert chunks[-1].choices[0].finish_reason == "content_filter"
    finally:
        service.moderator = None


def test_disconnect_frees_the_sequence(cpp_served):
    """A streaming client that leaves after its first piece: its sequence is freed at once,
    long before its 150 tokens would be done, and the server answers the next request."""
    url, service, backend, *_ = cpp_served
    inner = backend.inner
    body = {
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": 150,
        "temperature": 0,
        "stream": True,
    }
    backend.delay, backend.cancelled = 0.1, 0  # 150 tokens would take 15 s
    try:
        with httpx.stream("POST", url + CHAT, json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data:") and '"content": "' in line)
            next(line for line in lines if line.startswith("data:") and "content" in line)
        left = time.time()
        while time.time() - left < 5 and (
            inner.in_flight or any(s.request is not None for s in inner.slots)
        ):
            time.sleep(0.05)
        assert not any(s.request is not None for s in inner.slots)
        assert inner.in_flight == 0 and backend.cancelled == 1
        assert time.time() - left < 3
    finally:
        backend.delay = 0.0
    ok = httpx.post(url + CHAT, json={**body, "stream": False, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 4


def test_stop_fails_waiting_streams_instead_of_hanging(tiny_gguf):
    """stop() with a request still generating: the stream ends with an error, not a hang."""
    from openchatkit.inference.server_engine import SamplingParams

    _, backend = make_backend(tiny_gguf, max_batch=1)
    backend.start()
    errors: list[str] = []

    async def run():
        try:
            async for _ in backend.stream([1, 2, 3], SamplingParams(max_tokens=200, greedy=True)):
                if not errors:
                    errors.append("started")
                    threading.Thread(target=backend.stop).start()
        except RuntimeError as exc:
            errors.append(str(exc))

    asyncio.run(asyncio.wait_for(run(), 30))
    assert errors[0] == "started" and "shutting down" in errors[-1]
    assert not backend.healthy


def test_serve_py_llama_cpp_sigterm_drains(tiny_gguf, free_port):
    """`serve.py --backend llama.cpp` as a user runs it: two answers streaming when SIGTERM
    comes both run to their end, then the process exits."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SERVE), "--backend", "llama.cpp", "--model", str(tiny_gguf)]
    cmd += ["--port", str(free_port), "--max-batch", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).json()["backend"] == "llama.cpp":
                    break
            time.sleep(0.2)
        started, results = threading.Barrier(3), []
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
        body.update(temperature=0, stream=True, stop=["@@@"])

        def stream():
            with httpx.stream("POST", url + CHAT, json=body, timeout=60) as resp:
                lines = []
                for line in resp.iter_lines():
                    if not lines:
                        started.wait(30)
                    lines.append(line)
            results.append([x[6:] for x in lines if x.startswith("data: ")])

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert len(results) == 2
        for data in results:
            assert data[-1] == "[DONE]"
            final = json.loads(data[-2])["choices"][0]
            assert final["finish_reason"] in ("stop", "length")
        assert proc.wait(15) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_seeded_sampling_repeats(cpp_served):
    """temperature, top_p, top_k and seed reach the bot's sampler: the same seed gives the same
    answer, and sampling is not greedy decoding."""
    _, service, _, _, client, _ = cpp_served
    ask = dict(model=service.model_name, messages=[{"role": "user", "content": "Go on"}])
    ask.update(max_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    first = client.chat.completions.create(**ask).choices[0].message.content
    again = client.chat.completions.create(**ask).choices[0].message.content
    assert first == again
    others = {
        client.chat.completions.create(**{**ask, "seed": s}).choices[0].message.content
        for s in range(8, 12)
    }
    greedy = client.chat.completions.create(**{**ask, "temperature": 0}).choices[0].message
    assert len(others | {first}) > 1 and others | {first} != {greedy.content}
