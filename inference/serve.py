"""Serve a chat model over OpenAI's chat completions API, with a chat page at `/`.

Run (the embedded SmolLM2-135M-Instruct by default; nothing is downloaded):
    python inference/serve.py                                  # http://127.0.0.1:8000/
    make serve ARGS="--port 8080"
    python inference/serve.py --model huggingface_models/SmolLM2-135M-demo --feedback fb.jsonl
    python inference/serve.py --moderation huggingface_models/SmolLM2-135M-moderation-demo \
        --retrieval wiki_index
    python inference/serve.py --backend llama.cpp --model model.q8_0.gguf --max-batch 8
    python inference/serve.py --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
Any OpenAI client talks to it:
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
Ctrl-C or SIGTERM: the answers in flight finish (up to 10 s), then it exits.
"""

from __future__ import annotations

import argparse
import os
import sys

from openchatkit.cli import run_main
from openchatkit.errors import UserError
from openchatkit.inference.backends import BACKENDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="serve.py", description="OpenAI-compatible chat server with a chat page at /."
    )
    p.add_argument(
        "--model",
        default=None,
        help="local HF folder, hub id, layer-sharded folder or trainer checkpoint (full or LoRA) "
        "(default: embedded)",
    )
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter on top of --model")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): the bot's choice (inference/bot.py --help); llama.cpp runs GGUF "
        "files and the embedded model as parallel sequences",
    )
    p.add_argument(
        "--ctx-size",
        type=int,
        default=4096,
        help="llama.cpp: KV tokens per request, i.e. its window (4096; at most the model's); "
        "--max-batch of them are allocated",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--gpu-id", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENCHATKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $OPENCHATKIT_API_KEY, else none)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=256, help="new tokens when a request sets none"
    )
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="most new tokens per request")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body (KiB)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests in flight before 503s")
    p.add_argument("--retrieval", metavar="INDEX_DIR", help="answer from a FAISS index folder")
    p.add_argument("--retrieval-k", type=int, default=3, help="passages per question (3)")
    p.add_argument("--moderation", metavar="MODEL", help="moderation model; refuses flagged turns")
    p.add_argument("--moderation-threshold", type=float, metavar="P")
    p.add_argument("--moderation-examples", metavar="FILE.jsonl")
    p.add_argument("--feedback", metavar="FILE.jsonl", help="append the page's rated answers here")
    args = p.parse_args(argv)
    for flag, value in (
        ("--max-tokens", args.max_tokens),
        ("--max-tokens-cap", args.max_tokens_cap),
        ("--max-body-kb", args.max_body_kb),
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--retrieval-k", args.retrieval_k),
        ("--ctx-size", args.ctx_size),
    ):
        if value < 1:
            p.error(f"{flag} must be >= 1")
    if not 0 <= args.port <= 65535:
        p.error("--port must be in 0..65535")
    if args.max_tokens > args.max_tokens_cap:
        p.error("--max-tokens must be <= --max-tokens-cap")
    if args.moderation_threshold is not None and not 0 < args.moderation_threshold <= 1:
        p.error("--moderation-threshold must be in (0, 1]")
    if args.moderation is None and (args.moderation_threshold or args.moderation_examples):
        p.error("--moderation-threshold and --moderation-examples need --moderation MODEL")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key must not be empty")
    return args


def load_model(args: argparse.Namespace):
    """(LoadedModel, a function making the backend) for --model and --backend, chosen by the
    bot's rule (openchatkit/inference/backends.py choose_backend)."""
    from openchatkit.inference.backends import (
        choose_backend,
        load_torch_chat_model,
        refuse_torch_only_flags,
    )

    torch_flags = bool(args.device == "cuda" or args.dtype != "auto" or args.adapter)
    backend = choose_backend(args.model, args.backend, torch_flags)
    if backend == "llama.cpp":
        refuse_torch_only_flags({"--adapter": args.adapter, "--device cuda": args.device == "cuda"})
        from openchatkit.inference.server_llamacpp import LlamaCppBackend, load_llamacpp_for_server

        loaded = load_llamacpp_for_server(args.model, args.ctx_size)
        return loaded, lambda: LlamaCppBackend(
            loaded.model, loaded.context_window, max_batch=args.max_batch
        )
    loaded = load_torch_chat_model(
        args.model, device=args.device, dtype=args.dtype, gpu_id=args.gpu_id, adapter=args.adapter
    )
    from openchatkit.inference.server_engine import TorchBackend

    return loaded, lambda: TorchBackend(
        loaded.model, loaded.context_window, max_batch=args.max_batch
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from openchatkit.cli.chat import check_chat_paths

    check_chat_paths(args.retrieval, args.moderation, args.adapter)  # before the model loads
    if args.feedback is not None:
        from openchatkit.inference.server_feedback import FeedbackLog

        try:
            FeedbackLog.check_path(args.feedback)
        except ValueError as err:
            raise UserError(f"--feedback: {err}") from err
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(
            f"serve.py: warning: listening on {args.host} without --api-key: anyone who can "
            "reach this address can use the model",
            file=sys.stderr,
        )
    loaded, make_backend = load_model(args)
    if loaded.context_window <= args.max_tokens_cap:
        args.max_tokens_cap = loaded.context_window - 1
        args.max_tokens = min(args.max_tokens, args.max_tokens_cap)
    from openchatkit.cli.chat import load_moderation, load_retrieval

    retriever = load_retrieval(args.retrieval)
    # Always its own copy: the batching manager changes the chat model's attention while it runs.
    moderator = load_moderation(
        args.moderation, args.device, args.dtype, args.gpu_id, args.moderation_examples
    )

    from openchatkit.inference.server import ChatService, ServerConfig, default_settings
    from openchatkit.inference.server_app import run_server

    config = ServerConfig(
        api_key=args.api_key,
        max_body_bytes=args.max_body_kb * 1024,
        max_tokens_cap=args.max_tokens_cap,
        max_in_flight=args.max_queue,
        retrieval_k=args.retrieval_k,
        moderation_threshold=args.moderation_threshold,
        feedback=args.feedback,
        defaults=default_settings(loaded.generation_defaults, args.max_tokens),
    )
    backend = make_backend()
    service = ChatService(loaded, backend, config, retriever=retriever, moderator=moderator)
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(
        f"serve.py: {loaded.name} on {loaded.device} ({loaded.dtype}), {backend.name} backend, "
        f"{loaded.context_window}-token window; chat page {where}/ , API {where}/v1",
        file=sys.stderr,
        flush=True,
    )
    run_server(service, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="serve.py", log_level="WARNING"))
