"""Export a model the kit makes to one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile.

MODEL: an HF folder, a layer-sharded folder, a trainer checkpoint (a LoRA checkpoint is merged
with its base), or `embedded` (the default SmolLM2-135M-Instruct). Llama (Mistral, Qwen2) and
GPT-NeoX; GPT-J is refused (llama.cpp has no GPT-J graph).

    python tools/export_gguf.py --model huggingface_models/SmolLM2-135M-oig-demo \
        --out gguf/smollm2-demo.q8_0.gguf --outtype q8_0
    python tools/export_gguf.py --model model_ckpts/smollm2-lora --out gguf/lora.gguf
    python tools/export_gguf.py --model embedded --out gguf/smollm2.f16.gguf --outtype f16
    python tools/export_gguf.py --model huggingface_models/my-7b --out gguf/my-7b.q4_k_m.gguf \
        --outtype q4_k_m        # Ollama's usual type, by llama.cpp's own quantiser
Then:
    python inference/bot.py --model gguf/smollm2-demo.q8_0.gguf
    ollama create smollm2-demo -f gguf/smollm2-demo.q8_0.Modelfile

CPU only; memory about one tensor above the imports, whatever the model's size.
"""

from __future__ import annotations

import argparse
import sys

from openchatkit.cli import run_main

# openchatkit/export/gguf.py's OUTTYPES, then its LLAMACPP_OUTTYPES (made by llama.cpp's own
# quantiser, so they need the binding); written out here so a typo is refused without imports.
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q6_k", "q5_k_m", "q4_k_m")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="embedded", help="HF folder, layer-sharded folder, trainer "
        "checkpoint, or `embedded` (default)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="output GGUF file")
    p.add_argument(
        "--outtype", default="f16", choices=OUTTYPES,
        help="weight type of 2-D tensors (f16); q6_k, q5_k_m and q4_k_m are llama.cpp's k-quant "
        "mixtures, made by its own quantiser (needs the llama.cpp binding)",
    )  # fmt: skip
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter merged in first")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from openchatkit.export.gguf import LLAMACPP_OUTTYPES, export_gguf, modelfile_path, weight_types

    out = export_gguf(args.model, args.out, args.outtype, args.adapter, args.overwrite)
    types = weight_types(out)
    tally = ", ".join(f"{n} {name}" for name, n in types.items())
    note = ""
    if args.outtype in LLAMACPP_OUTTYPES and any(not t.endswith("_K") for t in types):
        note = "; llama.cpp used a legacy type where rows are not whole 256-weight k-quant blocks"
    print(
        f"{args.model} -> GGUF {args.outtype} (2-D weights: {tally}{note}); "
        f"Ollama: {modelfile_path(out)}",
        file=sys.stderr,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
