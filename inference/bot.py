"""Chat with a model in the terminal: the OpenChatKit bot.

Run (the embedded SmolLM2-135M-Instruct by default; nothing is downloaded):
    python inference/bot.py                                   # llama.cpp if installed, else torch
    python inference/bot.py --backend torch                   # CPU or the first GPU
    python inference/bot.py --model gguf/model.q8_0.gguf      # a GGUF file (tools/export_gguf.py)
    python inference/bot.py --prompt "What is the capital of France?" --no-sample
    printf 'Hello\n/quit\n' | python inference/bot.py         # one line per turn
A trainer's output as it is (its latest checkpoint; a LoRA run's adapters on their base):
    python inference/bot.py --model model_ckpts/smollm2-lora --backend torch
One GPU:
    python inference/bot.py --model togethercomputer/RedPajama-INCITE-Chat-3B-v1 --gpu-id 0
With a moderation model (each message and answer labelled first; see inference/moderate.py):
    python inference/bot.py --moderation huggingface_models/SmolLM2-135M-moderation-demo
    python inference/bot.py --model togethercomputer/RedPajama-INCITE-Chat-3B-v1 --gpu-id 0 \
        --moderation togethercomputer/GPT-JT-Moderation-6B
Big models across GPUs with CPU offload:
    python inference/bot.py --model togethercomputer/GPT-NeoXT-Chat-Base-20B -g 0:10 1:12 -r 64
Type /help in the session for the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.inference.backends import BACKENDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bot.py",
        description="Chat with a causal language model (default: the embedded SmolLM2-135M-Instruct).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="local HF folder, hub id, GGUF file, layer-sharded folder, or trainer checkpoint "
        "(full or LoRA: loaded in memory; default: the embedded model)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): llama.cpp for GGUF files and the embedded model when the "
        "llama-cpp-python binding is installed, else torch",
    )
    p.add_argument("--gpu-id", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer (128)")
    # Decoding defaults: the flag, else the model's generation_config.json, else upstream's
    # (sample, temperature 0.6, top-k 40, top-p 1.0). The embedded model asks for greedy.
    p.add_argument(
        "--sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample, or with --no-sample decode greedily (default: the model's "
        "generation_config.json, else sample)",
    )
    p.add_argument("--temperature", type=float, default=None, help="default 0.6")
    p.add_argument("--top-k", type=int, default=None, help="default 40; 0 turns it off")
    p.add_argument("--top-p", type=float, default=None, help="default 1.0")
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="answer TEXT once, then exit")
    p.add_argument(
        "-g",
        "--gpu-vram",
        nargs="+",
        metavar="ID:GiB",
        help="max GPU memory per device, e.g. -g 0:10 1:12 (spreads the model with accelerate)",
    )
    p.add_argument(
        "-r", "--cpu-ram", type=float, metavar="GiB", help="CPU RAM for offloaded layers"
    )
    p.add_argument("--load-in-8bit", action="store_true", help="int8 weights (bitsandbytes)")
    p.add_argument(
        "--adapter", metavar="DIR", help="a PEFT LoRA adapter on top of --model (export_lora.py)"
    )
    p.add_argument("--retrieval", metavar="INDEX_DIR", help="answer from a FAISS index folder")
    p.add_argument("--retrieval-k", type=int, default=3, help="passages per question (3)")
    p.add_argument(
        "--moderation",
        metavar="MODEL",
        help="moderation model (GPT-JT-Moderation format; may be the chat model itself): "
        "refuse flagged messages and answers, add a caution note for cautious labels",
    )
    p.add_argument(
        "--moderation-threshold",
        type=float,
        metavar="P",
        help="refuse when p(needs intervention) >= P (default: the moderation model's own, tuned "
        "on its held-out split; a causal LM's: INTERVENTION_THRESHOLD)",
    )
    p.add_argument(
        "--moderation-examples", metavar="FILE.jsonl", help="few-shot examples (text, label)"
    )
    args = p.parse_args(argv)
    from openchatkit.conversation import clean_text

    # Bytes that are not UTF-8 (argv keeps them as lone surrogates) become U+FFFD.
    args.prompt = clean_text(args.prompt) if args.prompt is not None else None
    args.system = clean_text(args.system) if args.system is not None else None
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 0:
        p.error("--top-k must be >= 0")
    if args.retrieval_k < 1:
        p.error("--retrieval-k must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.moderation_threshold is not None and not 0 < args.moderation_threshold <= 1:
        p.error("--moderation-threshold must be in (0, 1]")
    if args.moderation is None and (args.moderation_threshold or args.moderation_examples):
        p.error("--moderation-threshold and --moderation-examples need --moderation MODEL")
    return args


def read_lines(interactive: bool):
    """Yield input lines: with readline editing and history on a terminal, plain from a pipe."""
    if interactive:
        import signal

        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # Started with SIGINT ignored (a background job of a non-interactive shell, nohup):
            # Python then leaves it ignored, but on a terminal Ctrl-C must stop an answer.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            import readline

            history = Path.home() / ".cache" / "openchatkit" / "bot_history"
            history.parent.mkdir(parents=True, exist_ok=True)
            if history.exists():
                readline.read_history_file(history)
            readline.set_history_length(1000)
        except (ImportError, OSError):
            readline, history = None, None
        try:
            while True:
                try:
                    yield input(">>> ")
                except KeyboardInterrupt:
                    print()  # Ctrl-C at the prompt clears the line, like Python's REPL
                except EOFError:
                    print()
                    return
        finally:
            if readline is not None:
                try:
                    readline.write_history_file(history)
                except OSError:
                    pass
    else:
        # A byte that is not UTF-8 on a pipe becomes U+FFFD rather than ending the session.
        sys.stdin.reconfigure(errors="surrogateescape")
        for line in sys.stdin:
            yield line.rstrip("\n")


def decoding_settings(args: argparse.Namespace, model_defaults: dict):
    """Flags first, then the model's generation_config.json, then upstream's defaults."""
    from openchatkit.inference.generation import GenerationSettings

    def pick(flag, key, fallback):
        value = model_defaults.get(key, fallback) if flag is None else flag
        return type(fallback)(value)

    return GenerationSettings(
        max_tokens=args.max_tokens,
        sample=pick(args.sample, "do_sample", True),
        temperature=pick(args.temperature, "temperature", 0.6),
        top_k=pick(args.top_k, "top_k", 40),
        top_p=pick(args.top_p, "top_p", 1.0),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from openchatkit.cli.chat import check_chat_paths

    check_chat_paths(args.retrieval, args.moderation, args.adapter)  # before the model loads
    from openchatkit.inference.backends import choose_backend, is_gguf_path

    torch_flags = bool(
        args.device == "cuda"
        or args.dtype != "auto"
        or args.gpu_vram
        or args.cpu_ram
        or args.load_in_8bit
        or args.adapter
    )
    backend = choose_backend(args.model, args.backend, torch_flags)
    if backend == "llama.cpp":
        from openchatkit.inference.backends import (
            load_llamacpp_chat_model,
            refuse_torch_only_flags,
        )

        refuse_torch_only_flags(
            {
                "--adapter": args.adapter,
                "-g/--gpu-vram": args.gpu_vram,
                "-r/--cpu-ram": args.cpu_ram,
                "--load-in-8bit": args.load_in_8bit,
            }
        )
        loaded = load_llamacpp_chat_model(args.model)
    else:
        from openchatkit.inference.backends import load_torch_chat_model

        loaded = load_torch_chat_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            gpu_id=args.gpu_id,
            adapter=args.adapter,
            gpu_vram=args.gpu_vram,
            cpu_ram=args.cpu_ram,
            load_in_8bit=args.load_in_8bit,
        )
    from openchatkit.cli.chat import load_moderation, load_retrieval
    from openchatkit.models.embedded import is_embedded_name

    retriever = load_retrieval(args.retrieval)
    # The llama.cpp backend's model is no torch module: the moderator loads its own.
    same = args.moderation is not None and (
        backend == "torch"
        and (
            args.moderation == args.model
            or (is_embedded_name(args.moderation) and is_embedded_name(args.model))
        )
    )
    moderator = load_moderation(
        args.moderation,
        args.device,
        args.dtype,
        args.gpu_id,
        args.moderation_examples,
        loaded=loaded if same else None,
    )
    from openchatkit.inference.session import ChatSession

    settings = decoding_settings(args, loaded.generation_defaults)
    session = ChatSession(
        loaded,
        settings,
        system=args.system,
        stream=not args.no_stream,
        retriever=retriever,
        retrieval_k=args.retrieval_k,
        moderator=moderator,
        moderation_threshold=args.moderation_threshold,
    )
    if args.prompt is not None:
        session.say(args.prompt)
        return 0

    interactive = sys.stdin.isatty()
    extra = f", retrieval from {args.retrieval} ({len(retriever)} passages)" if retriever else ""
    extra += f", moderation by {moderator.name}" if moderator else ""
    # Which backend runs, and for llama.cpp which file (the embedded model's cached export).
    if backend == "llama.cpp":
        from openchatkit.inference.llamacpp import cpu_backend_variant

        variant = cpu_backend_variant()  # the CPU backend llama.cpp picked for this CPU
        runs = f"llama.cpp{f' ({variant})' if variant else ''} from {loaded.model.path}"
    else:
        runs = "torch"
    from openchatkit.inference.backends import binding_available

    if args.backend == "auto" and not torch_flags and not binding_available():
        if is_embedded_name(args.model) or is_gguf_path(args.model):
            runs += " (llama.cpp, several times faster on a CPU, needs llama-cpp-python: `make install`)"
    print(
        f"OpenChatKit bot: {loaded.name} on {runs}, {loaded.device} ({loaded.dtype}), "
        f"{session.format.name} format, {loaded.context_window}-token window{extra}.\n"
        "Type /help for commands, /quit or Ctrl-D to leave.",
        file=sys.stderr,
    )
    for line in read_lines(interactive):
        try:
            if not session.handle_line(line):
                break
        except KeyboardInterrupt:  # between commands: the conversation is kept, as inside them
            print("(interrupted; the conversation is kept)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="bot.py", log_level="WARNING"))
