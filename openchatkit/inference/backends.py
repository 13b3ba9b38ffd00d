"""Which backend runs the chat model, and loading a GGUF file for either.

- `llama.cpp`: GGUF files (`--model FILE.gguf`) and the embedded model (its f16 export, made
  once into the user's cache: openchatkit/inference/embedded_gguf.py) through llama-cpp-python
  (openchatkit/inference/llamacpp.py). The default for both when the binding is installed:
  several times faster on a CPU.
- `torch`: HF folders and hub ids, or a GGUF file transformers can read (dequantised to fp32).

Both give a `LoadedModel` the one chat session (session.py) drives; only `.model` differs.
"""

from __future__ import annotations

from pathlib import Path

from openchatkit.errors import UserError
from openchatkit.models.loading import LoadedModel

BACKENDS = ("auto", "torch", "llama.cpp")


def is_gguf_path(name: str | None) -> bool:
    return name is not None and name.lower().endswith(".gguf")


def binding_available() -> bool:
    """True when llama-cpp-python is importable (found without importing it, or torch: the
    backend choice comes before a bad --model is refused, which must stay fast)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def choose_backend(model: str | None, backend: str = "auto", torch_flags: bool = False) -> str:
    """'torch' or 'llama.cpp' for `--model` and `--backend`. UserError for a model the chosen
    backend cannot run. `torch_flags`: the user gave flags only torch honours (--device cuda,
    --dtype, -g, -r, --load-in-8bit, --adapter): `auto` then means torch."""
    from openchatkit.models.embedded import is_embedded_name

    gguf_source = is_gguf_path(model) or is_embedded_name(model)
    if backend == "auto":
        # The embedded model runs on llama.cpp from its f16 export, not its shipped Q4_1 file:
        # llama.cpp runs Q4_1 (and q8_0) with 8-bit activations, which flips a close greedy
        # choice on "What is the capital of France?" (logit margin 0.08 in fp32) and answers in
        # French, where torch and the f16 export say Paris (openchatkit/inference/embedded_gguf.py).
        if torch_flags or not gguf_source or not binding_available():
            return "torch"  # transformers reads some GGUF files; it says so when it cannot
        return "llama.cpp"
    if backend == "llama.cpp" and not gguf_source:
        raise UserError(
            f"--backend llama.cpp runs GGUF files; {model} is not one: export it with "
            "python tools/export_gguf.py --model MODEL --out FILE.gguf"
        )
    return backend


def refuse_torch_only_flags(flags: dict[str, object]) -> None:
    """On the llama.cpp backend: a one-line UserError naming the first of `flags` (flag name ->
    its value) that was given, since only the torch backend honours them."""
    for flag, value in flags.items():
        if value:
            raise UserError(f"{flag} is for --backend torch (llama.cpp runs the GGUF as is)")


def load_torch_chat_model(
    model: str | None,
    device: str = "auto",
    dtype: str = "auto",
    gpu_id: int = 0,
    adapter: str | None = None,
    gpu_vram: list[str] | None = None,
    cpu_ram: float | None = None,
    load_in_8bit: bool = False,
) -> LoadedModel:
    """The torch backend's model for `--model`: a GGUF file dequantised by transformers, else
    any MODEL form (HF folder, hub id, embedded, layer-sharded folder, trainer or LoRA
    checkpoint) through models/any_model.py, which finds a bad --model before importing torch.
    A float32 or bfloat16 model on an x86-64 CPU gets oneDNN-packed linear layers
    (models/packed_linear.py: 1.2-2.7x faster matrix products at the few rows a chat or server
    step multiplies)."""
    if is_gguf_path(model):
        loaded = load_gguf_with_transformers(model, device, dtype)
    else:
        from openchatkit.models.any_model import load_any_model

        loaded = load_any_model(
            model,
            device=device,
            dtype=dtype,
            gpu_id=gpu_id,
            adapter=adapter,
            gpu_vram=gpu_vram,
            cpu_ram=cpu_ram,
            load_in_8bit=load_in_8bit,
        )
    from openchatkit.models.packed_linear import pack_linears  # torch: after the checks

    pack_linears(loaded.model)
    return loaded


def load_llamacpp_chat_model(
    model: str | None, n_ctx: int | None = None, threads: int | None = None
) -> LoadedModel:
    """A GGUF file, or the embedded model's cached f16 export (written on first use), loaded in
    llama.cpp with its own tokenizer."""
    from openchatkit.inference.embedded_gguf import embedded_llamacpp_file
    from openchatkit.inference.llamacpp import (
        LlamaCppModel,
        LlamaCppTokenizer,
        describe_file_type,
    )
    from openchatkit.models.embedded import (
        EMBEDDED_GENERATION_DEFAULTS,
        EMBEDDED_MODEL_NAME,
        is_embedded_name,
    )

    embedded = is_embedded_name(model)
    path = embedded_llamacpp_file() if embedded else Path(str(model)).expanduser()
    if not path.is_file():
        raise UserError(f"--model {model}: no such file")
    cpp = LlamaCppModel(path, n_ctx=n_ctx, n_threads=threads)
    tokenizer = LlamaCppTokenizer(cpp)
    return LoadedModel(
        cpp,
        tokenizer,
        EMBEDDED_MODEL_NAME if embedded else path.name,
        "cpu",
        f"llama.cpp {describe_file_type(cpp.file_type)}, {cpp.threads} threads",
        cpp.n_ctx,
        dict(EMBEDDED_GENERATION_DEFAULTS) if embedded else {},
    )


def load_gguf_with_transformers(path: str, device: str = "auto", dtype: str = "auto"):
    """A GGUF file dequantised by transformers for the torch backend; one-line UserError when
    transformers cannot read it (an architecture it lacks, a damaged file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openchatkit.models.loading import pick_device, pick_dtype, quiet_transformers

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--model {path}: no such file")
    dev = pick_device(device, 0)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            model = AutoModelForCausalLM.from_pretrained(
                file.parent, gguf_file=file.name, dtype=torch_dtype
            )
    except Exception as err:  # ValueError, OSError, KeyError, struct errors, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"--model {path}: transformers cannot read this GGUF file for --backend torch "
            f"({first}); use --backend llama.cpp"
        ) from None
    model.to(dev).eval()
    window = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(
        model,
        tokenizer,
        file.name,
        dev,
        str(torch_dtype).split(".")[-1],
        int(window),
        {},
    )
