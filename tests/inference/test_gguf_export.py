"""GGUF export (openchatkit/export/gguf.py) checked through llama.cpp against the torch model.

Tiny random Llama and GPT-NeoX models (the embedded model's 49152-token tokenizer, so llama.cpp
loads a real vocabulary) are exported in f32, f16 and q8_0, run by llama.cpp
(openchatkit/inference/llamacpp.py) and compared with transformers, logits step by step along a
greedy continuation.

Error bounds, relative to the largest |logit| of the step (L layers, so 2L + 2 matrix products
lie between the embedding and the logits, each adding its relative error to the residual stream):
- f32: 1e-3 (the issue's bound; float32 sums in another order differ by ~1e-6).
- f16: weights rounded to 11 bits (2^-11 relative) and, on the CPU, activations rounded to f16
  before each f16 product: 2 * 2^-11 per product, (2L + 2) * 2 * 2^-11 in all.
- q8_0: weights in blocks of 32 with a scale of absmax/127, rounding error <= absmax/254
  (1/254 of the block's largest weight), and activations quantised the same way before each
  q8_0 product: 2/254 per product, (2L + 2) * 2/254 in all.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

LAYERS = 2
PROMPT = "The lighthouse keeper opened the door and"
STEPS = 8
BOUNDS = {
    "f32": 1e-3,
    "f16": (2 * LAYERS + 2) * 2 * 2**-11,
    "q8_0": (2 * LAYERS + 2) * 2 / 254,
}


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def tiny(request, tmp_path_factory, make_tiny_gguf_source):
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    return request.param, make_tiny_gguf_source(folder, request.param, layers=LAYERS)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory, gguf_exports):
    """exported(outtype) -> the tiny model's GGUF in `outtype`, written once per module: the
    logit test and the read-back test check the same file (neither writes to it)."""
    kind, folder = tiny
    return gguf_exports(folder, tmp_path_factory.mktemp(f"gguf-{kind}"), kind)


def torch_steps(folder: Path, ids: list[int], steps: int):
    """Greedy continuation with transformers: (token ids, logits (steps, vocab))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out_ids, rows = [], []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            rows.append(logits)
            token = int(torch.argmax(logits))
            out_ids.append(token)
            seq.append(token)
    return out_ids, torch.stack(rows)


def cpp_steps(path: Path, ids: list[int], steps: int, forced: list[int] | None = None):
    """The same with llama.cpp; `forced` feeds the given tokens instead of its own choice, so
    the logits are compared at the same positions."""
    from openchatkit.inference.llamacpp import LlamaCppModel

    cpp = LlamaCppModel(path, n_ctx=256, n_threads=1)
    try:
        cpp.evaluate(list(ids))
        out_ids, rows = [], []
        for i in range(steps):
            logits = cpp.logits().clone()
            rows.append(logits)
            token = int(torch.argmax(logits))
            out_ids.append(token)
            cpp._decode([forced[i] if forced else token])
        return out_ids, torch.stack(rows)
    finally:
        cpp.close()


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llamacpp_logits_match_torch(tiny, outtype, exported):
    from transformers import AutoTokenizer

    kind, folder = tiny
    out = exported(outtype)
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]
    ref_ids, ref = torch_steps(folder, ids, STEPS)
    got_ids, got = cpp_steps(out, ids, STEPS, forced=ref_ids)
    scale = ref.abs().max(dim=-1, keepdim=True).values
    rel = ((got - ref).abs() / scale).max().item()
    assert rel <= BOUNDS[outtype], f"{kind} {outtype}: max relative logit error {rel:.2e}"
    if outtype == "f32":
        assert got_ids == ref_ids  # greedy continuation, token for token
        assert cpp_steps(out, ids, STEPS)[0] == ref_ids  # and on its own choices


def _block_bound(src: np.ndarray, qtype) -> np.ndarray:
    """Per element: the largest error type `qtype` may make on `src` (see module doc)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.zeros_like(src)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.abs(src) * 2**-11 + 1e-7
    blocks = src.reshape(-1, 32)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        # scale d = absmax/127 stored as f16: rounding d/2, plus 127 * (f16 error of d).
        bound = np.abs(blocks).max(axis=1, keepdims=True) * (0.5 / 127 + 2**-10)
    elif qtype == gguf.GGMLQuantizationType.Q4_1:
        # scale (max - min)/15 and min, both f16: rounding d/2 plus their f16 errors.
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        bound = (hi - lo) * (0.5 / 15 + 2**-10) + np.abs(lo) * 2**-10
    else:
        raise AssertionError(qtype)
    return np.broadcast_to(bound, blocks.shape).reshape(src.shape)


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_1"])
def test_every_tensor_reads_back_within_its_type_bound(tiny, outtype, exported):
    from openchatkit.export.gguf_arch import GGUF_ARCHS
    from openchatkit.models.hf_weights import HFWeights

    kind, folder = tiny
    out = exported(outtype)
    spec = GGUF_ARCHS[kind]
    names = gguf.get_tensor_name_map(spec.arch, LAYERS)
    weights = HFWeights(folder)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    source = {}
    for key in weights.keys():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name and not spec.is_ignored(key):
            source[name] = spec.transform(key, weights.get(key), config).float().numpy()
    reader = gguf.GGUFReader(out)
    assert {t.name for t in reader.tensors} == set(source)
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(source[t.name].shape)
        err = np.abs(got - source[t.name])
        bound = _block_bound(source[t.name], t.tensor_type)
        assert (err <= bound).all(), f"{t.name} ({t.tensor_type.name}): max error {err.max()}"
    fields = reader.fields
    arch = spec.name
    assert int(fields[f"{arch}.block_count"].parts[-1][0]) == LAYERS
    if kind == "gpt_neox":  # from rope_parameters: transformers 5 writes no rotary_pct
        assert int(fields[f"{arch}.rope.dimension_count"].parts[-1][0]) == 8
    pre = bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode()
    assert pre == "smollm"
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{out.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile  # SmolLM2's ChatML template


def test_openchatkit_format_model_gets_its_template_and_stop(tiny, tmp_path):
    """A model without a chat template (fine-tuned on <human>/<bot>) is exported with the
    OpenChatKit template, and its Modelfile stops at <human>:."""
    import json
    import shutil

    from openchatkit.conversation import OPENCHATKIT_CHAT_TEMPLATE
    from openchatkit.export.gguf import export_gguf

    kind, folder = tiny
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = export_gguf(str(plain), tmp_path / "ock.gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == OPENCHATKIT_CHAT_TEMPLATE
    text = out.with_suffix(".Modelfile").read_text()
    assert 'PARAMETER stop "<human>:"' in text and "<bot>:" in text
