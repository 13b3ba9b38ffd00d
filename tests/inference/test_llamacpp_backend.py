"""The chat session on the llama.cpp backend (openchatkit/inference/llamacpp.py): the same session
code as the torch backend, KV cache kept across turns, and the embedded model's greedy text equal
to transformers' after a GGUF export."""

from __future__ import annotations

import io
import json

import pytest
import torch

PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def cpp_loaded():
    from openchatkit.inference.backends import load_llamacpp_chat_model

    return load_llamacpp_chat_model(None, n_ctx=2048, threads=1)


@pytest.fixture(scope="module")
def torch_loaded():
    """The embedded model on torch in float32, loaded once for the two tests that read it
    (neither changes it: sessions wrap it)."""
    from openchatkit.models.loading import load_chat_model

    return load_chat_model(None, device="cpu", dtype="float32")


def make_session(loaded, max_tokens=24):
    from openchatkit.inference.generation import GenerationSettings
    from openchatkit.inference.session import ChatSession

    out, err = io.StringIO(), io.StringIO()
    settings = GenerationSettings(max_tokens=max_tokens, sample=False)
    return ChatSession(loaded, settings, out=out, err=err), out, err


def test_session_commands_and_stats_on_llamacpp(cpp_loaded, tmp_path):
    session, out, err = make_session(cpp_loaded)
    assert session.chat_model is cpp_loaded.model  # the backend itself, no torch wrapper
    session.handle_line("What is the capital of France?")
    # The embedded model's f16 export (the shipped Q4_1 file answers in French here).
    assert "Paris" in out.getvalue()
    assert "[prompt " in err.getvalue() and "tokens/s" in err.getvalue()
    session.handle_line(f"/save {tmp_path / 'chat.json'}")
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    session.handle_line("/reset")
    assert session.messages == []
    session.handle_line(f"/load {tmp_path / 'chat.json'}")
    assert session.messages == saved["messages"]
    session.handle_line("/raw_prompt")
    assert "<|im_start|>user\nWhat is the capital of France?" in out.getvalue()
    session.handle_line("/set max_tokens 4")
    session.handle_line("/raw_say Once upon a time")
    assert session.last_stats.generated_tokens <= 4


def test_next_turn_evaluates_only_new_tokens(cpp_loaded):
    session, out, err = make_session(cpp_loaded, max_tokens=16)
    cpp = cpp_loaded.model
    session.say("Hello!")
    first = cpp.last_evaluated
    assert first == session.last_stats.prompt_tokens
    cached_before = len(cpp.cached)
    session.say("And what is two plus two?")
    # Only the end of the last answer (its last token was never evaluated) and the new turn.
    new = session.last_stats.prompt_tokens - (cached_before - 1)
    assert cpp.last_evaluated <= new + 1
    assert cpp.last_evaluated < session.last_stats.prompt_tokens / 2


def test_interrupted_step_drops_the_cache(cpp_loaded):
    from openchatkit.inference.generation import GenerationSettings

    cpp = cpp_loaded.model
    ids = cpp_loaded.tokenizer("Tell me a story.", return_tensors="pt")["input_ids"]
    gen = cpp.generate_ids(ids, GenerationSettings(max_tokens=8, sample=False), [])
    next(gen)
    with pytest.raises(KeyboardInterrupt):
        gen.throw(KeyboardInterrupt)
    assert cpp.cached == []
    assert cpp.evaluate(ids[0].tolist()) == ids.shape[1]  # the whole prompt again


def test_torch_backend_keeps_its_cache_with_the_same_text(torch_loaded):
    """The torch backend's cross-turn cache gives the answers a fresh session gives."""
    from openchatkit.inference.generation import chat_backend

    loaded = torch_loaded
    session, out, err = make_session(loaded, max_tokens=12)
    session.chat_model = chat_backend(loaded.model, keep_cache=True)
    session.say("Hello!")
    session.say("What is the capital of France?")
    assert session.chat_model.last_evaluated < session.last_stats.prompt_tokens / 2
    fresh, fresh_out, _ = make_session(loaded, max_tokens=12)
    fresh.messages = session.messages[:2]
    fresh.say("What is the capital of France?")
    assert fresh.messages[-1] == session.messages[-1]


def test_embedded_model_exported_f16_greedy_equals_torch(tmp_path, torch_loaded):
    from openchatkit.conversation import PromptFormat
    from openchatkit.export.gguf import export_gguf
    from openchatkit.inference.generation import GenerationSettings, stream_text
    from openchatkit.inference.llamacpp import LlamaCppModel, LlamaCppTokenizer

    out = export_gguf(None, tmp_path / "smollm2.f16.gguf", "f16")
    loaded = torch_loaded
    cpp = LlamaCppModel(out, n_ctx=1024, n_threads=1)
    cpp_tok = LlamaCppTokenizer(cpp)
    settings = GenerationSettings(max_tokens=32, sample=False)
    fmt = PromptFormat.for_tokenizer(loaded.tokenizer)
    for prompt in PROMPTS:
        text = fmt.render([{"role": "user", "content": prompt}])
        assert cpp_tok.apply_chat_template([{"role": "user", "content": prompt}]) == text
        hf_ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        cpp_ids = cpp_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert torch.equal(hf_ids, cpp_ids)
        eos = [loaded.tokenizer.eos_token_id]
        want = "".join(stream_text(loaded.model, loaded.tokenizer, hf_ids, settings, eos))
        got = "".join(stream_text(cpp, cpp_tok, cpp_ids, settings, cpp_tok.eos_token_id))
        assert got == want, prompt
    cpp.close()
