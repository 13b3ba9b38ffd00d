"""What GGUF quantisation costs: held-out perplexity of a model exported to GGUF and run by llama.cpp,
against the same model in fp32 run by torch.

The model is exported with the kit's exporter (tools/export_gguf.py) to each --outtypes in a
temporary folder, then every file and the torch fp32 model score the same token ids (the HF
tokenizer's, so only the weights differ) with the kit's perplexity code
(openchatkit/evaluation/perplexity.py, lm-eval's rolling windows); llama.cpp's logits come from a
context that keeps every position's logits. The f32 export is the check of the method: it must
give torch's figure to about 1e-4.

    python benchmarks/gguf_quant_perplexity.py                       # the demo model, valid split
    python benchmarks/gguf_quant_perplexity.py --model huggingface_models/SmolLM2-135M-OIG-demo \
        --data data/OIG-sample/valid.jsonl --outtypes f32 f16 q8_0 q4_1 --threads 2

(`make demo` writes huggingface_models/SmolLM2-135M-OIG-demo.) Deterministic: one run is enough.

With `--base MODEL` (the model the fine-tune started from; `embedded` for the demo) each file also
gets the share of the fine-tune's weight change it keeps: for the 2-D weights of the transformer
blocks, <q - base, tuned - base> / |tuned - base|^2 over all of them (q: the file's weights
dequantised; 1 = every change kept, 0 = the base's weights back).

    python benchmarks/gguf_quant_perplexity.py --base embedded \
        --outtypes f16 bf16 q8_0 q6_k q5_k_m q4_k_m q4_0 q4_1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


class LlamaCppLogits:
    """A GGUF file in llama.cpp, called like a causal LM on (1, T) ids: logits (1, T, vocab)."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        from openchatkit.inference.llamacpp import LlamaCppModel

        self.cpp = LlamaCppModel(path, n_ctx=n_ctx, n_threads=threads, n_batch=n_ctx)

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        cpp, L = self.cpp, self.cpp.L
        assert ids.shape[0] == 1, "one window per call"
        tokens = ids[0].tolist()
        cpp.reset()
        b = cpp.batch
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, 1
            b.seq_id[i][0] = 0
        b.n_tokens = len(tokens)
        assert L.llama_decode(cpp.ctx, b) == 0
        rows = [
            np.ctypeslib.as_array(L.llama_get_logits_ith(cpp.ctx, i), shape=(cpp.n_vocab,))
            for i in range(len(tokens))
        ]
        cpp.reset()
        return SimpleNamespace(logits=torch.from_numpy(np.stack(rows))[None])

    def close(self) -> None:
        self.cpp.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "huggingface_models/SmolLM2-135M-OIG-demo"))
    p.add_argument("--data", default=str(ROOT / "data/OIG-sample/valid.jsonl"))
    p.add_argument("--outtypes", nargs="+", default=["f32", "q8_0", "q4_1"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512, help="window length (tokens)")
    p.add_argument("--base", help="the fine-tune's base model: also report the change kept")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openchatkit.evaluation.perplexity import perplexity, read_records, render_records
    from openchatkit.export.gguf import export_gguf

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = render_records(read_records([args.data]), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    common = dict(batch_size=1, max_length=args.max_length, device="cpu", progress=False)
    base = perplexity(model, tokenizer, texts, **common).metrics()
    del model
    print(f"{args.model} on {args.data}: {base['n']} records, {base['tokens']} tokens", flush=True)
    print(f"{'weights':<22} {'token ppl':>10} {'vs fp32':>9} {'bits/byte':>10} {'file MB':>8}")
    print(f"{'fp32 (torch)':<22} {base['token_perplexity']:>10.4f} {'':>9} "
          f"{base['bits_per_byte']:>10.4f} {'':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gguf-ppl-") as tmp:
        change = None
        if args.base:  # the weights as llama.cpp lays them out, base and fine-tune, in f32
            base_file = export_gguf(args.base, Path(tmp) / "base.f32.gguf", "f32")
            tuned_file = export_gguf(args.model, Path(tmp) / "tuned.f32.gguf", "f32")
            change = (block_weights(base_file), block_weights(tuned_file))
        for outtype in args.outtypes:
            out = Path(tmp) / f"model.{outtype}.gguf"
            t0 = time.perf_counter()
            export_gguf(args.model, out, outtype)
            export_s = time.perf_counter() - t0
            scorer = LlamaCppLogits(out, n_ctx=args.max_length + 1, threads=args.threads)
            m = perplexity(scorer, tokenizer, texts, **common).metrics()
            scorer.close()
            rel = m["token_perplexity"] / base["token_perplexity"] - 1
            print(
                f"{outtype + ' (llama.cpp)':<22} {m['token_perplexity']:>10.4f} {rel:>+8.2%} "
                f"{m['bits_per_byte']:>10.4f} {out.stat().st_size / 1e6:>8.0f}"
                f"   (export {export_s:.0f} s)"
                + (f", change kept {kept_share(out, *change):.2f}" if change else ""),
                flush=True,
            )
            out.unlink()


def block_weights(path: Path) -> dict[str, np.ndarray]:
    """The 2-D weights of the transformer blocks of a GGUF file, dequantised to float32."""
    import gguf

    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).ravel()
        for t in gguf.GGUFReader(path).tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    }


def kept_share(path: Path, base: dict, tuned: dict) -> float:
    """<q - base, tuned - base> / |tuned - base|^2 over the block weights of `path`."""
    num = den = 0.0
    for name, q in block_weights(path).items():
        delta = (tuned[name] - base[name]).astype(np.float64)
        num += float(((q - base[name]) * delta).sum())
        den += float((delta * delta).sum())
    return num / den


if __name__ == "__main__":
    main()
