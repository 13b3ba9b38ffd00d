"""The k-quant export types (`--outtype q6_k | q5_k_m | q4_k_m`), made by llama.cpp's own quantiser
from the kit's f16 export (openchatkit/export/gguf.py, `write_llamacpp_quant`).

A tiny random Llama whose rows are whole 256-weight k-quant super-blocks (hidden 256, feed-forward
512), so every 2-D weight takes a k-quant type rather than llama.cpp's fallback for short rows.

Error bounds, derived as in test_gguf_export.py (relative to the largest |logit| of a step, 2L + 2
matrix products between the embedding and the logits; the activations are quantised to 8 bits,
1/254, before each k-quant product):
- Q4_K: 4-bit codes over a block's [min, max] range (scale and min themselves 6-bit codes of an f16
  super-block scale): rounding error at most range/30 <= absmax/15 per weight.
- Q6_K: 6-bit signed codes, scale ~ absmax/32: at most absmax/64 per weight, 1/32 with the scale's
  own 8-bit code.
Per tensor read back with gguf's dequantiser, the root-mean-square error against the source, for
weights drawn from N(0, s) (here s = 1/sqrt(hidden), so that each product keeps the scale
of the residual stream and errors add rather than grow): uniform rounding error has rms step/sqrt(12); a 32-weight block of
Gaussians spans about 4 s, so Q4_K's step is about 4s/15 and its rms error 0.077 s (bound 0.1 s);
Q6_K's step about 2s/32 (16 weights span about +-2 s): rms 0.018 s (bound 0.03 s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

LAYERS = 2
PROMPT = "The lighthouse keeper opened the door and"
STEPS = 6
STD = 256**-0.5  # weights N(0, STD): each product keeps the residual stream's scale (gain 1)
PER_PRODUCT = {"q4_k_m": 1 / 15 + 1 / 254, "q6_k": 1 / 32 + 1 / 254}
RMS = {gguf.GGMLQuantizationType.Q4_K: 0.1, gguf.GGMLQuantizationType.Q6_K: 0.03}


def make_tiny_llama(folder: Path, hidden: int = 256, ffn: int = 512) -> Path:
    """A tiny random Llama (weights N(0, STD), norms around 1) with the embedded model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from openchatkit.models.embedded import ensure_embedded_model

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=ffn,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, STD)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_embedded_model()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("kquant") / "hf")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from openchatkit.export.gguf import export_gguf

    base = tmp_path_factory.mktemp("kquant-out")
    files: dict[str, Path] = {}

    def get(outtype: str) -> Path:
        if outtype not in files:
            files[outtype] = export_gguf(str(tiny), base / f"tiny.{outtype}.gguf", outtype)
        return files[outtype]

    return get


@pytest.mark.parametrize("outtype", ["q4_k_m", "q6_k"])
def test_kquant_logits_match_torch(tiny, exported, outtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openchatkit.inference.llamacpp import LlamaCppModel

    ids = AutoTokenizer.from_pretrained(tiny)(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    cpp = LlamaCppModel(exported(outtype), n_ctx=256, n_threads=1)
    seq, worst = list(ids), 0.0
    try:
        cpp.evaluate(seq)
        with torch.no_grad():
            for _ in range(STEPS):  # along torch's greedy path, both fed the same tokens
                ref = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                got = cpp.logits().clone()
                worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
                token = int(torch.argmax(ref))
                seq.append(token)
                cpp._decode([token])
    finally:
        cpp.close()
    bound = (2 * LAYERS + 2) * PER_PRODUCT[outtype]
    assert worst <= bound, f"{outtype}: max relative logit error {worst:.3f} > {bound:.3f}"
    assert worst > 1e-4  # quantised: not the f16 file passed through


@pytest.mark.parametrize(
    "outtype, file_type, types",
    [
        ("q4_k_m", gguf.LlamaFileType.MOSTLY_Q4_K_M, {"Q4_K", "Q6_K"}),
        ("q6_k", gguf.LlamaFileType.MOSTLY_Q6_K, {"Q6_K"}),
    ],
)
def test_kquant_file_types_and_read_back(tiny, exported, outtype, file_type, types):
    from openchatkit.export.gguf_arch import GGUF_ARCHS
    from openchatkit.models.hf_weights import HFWeights

    out = exported(outtype)
    reader = gguf.GGUFReader(out)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == file_type
    spec = GGUF_ARCHS["llama"]
    names = gguf.get_tensor_name_map(spec.arch, LAYERS)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny)
    weights = HFWeights(tiny)
    source = {}
    for key in weights.keys():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name and not spec.is_ignored(key):
            source[name] = spec.transform(key, weights.get(key), config).float().numpy()
    assert {t.name for t in reader.tensors} == set(source)
    seen = set()
    for t in reader.tensors:
        if len(source[t.name].shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        seen.add(t.tensor_type.name)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(source[t.name].shape)
        rms = float(np.sqrt(np.mean((got - source[t.name]) ** 2)))
        bound = RMS.get(t.tensor_type, 0.1) * STD
        assert rms <= bound, f"{t.name} ({t.tensor_type.name}): rms error {rms:.4f} > {bound}"
    assert types <= seen | {"Q6_K"} and seen <= types | {"Q8_0"}, seen
    assert out.with_suffix(".Modelfile").read_text().startswith(f"FROM ./{out.name}\n")
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []  # the f16 source and the temporary output are gone


def test_script_lists_every_outtype():
    """tools/export_gguf.py writes its --outtype choices out (a typo is refused without
    imports): they must be the library's, in order."""
    import ast

    from openchatkit.export.gguf import LLAMACPP_OUTTYPES, OUTTYPES

    script = Path(__file__).resolve().parents[2] / "tools" / "export_gguf.py"
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "OUTTYPES":
            assert ast.literal_eval(node.value) == (*OUTTYPES, *LLAMACPP_OUTTYPES)
            return
    raise AssertionError("no OUTTYPES in tools/export_gguf.py")


def test_without_the_binding_kquants_are_refused_before_any_work(tiny, tmp_path, monkeypatch):
    from openchatkit.errors import UserError
    from openchatkit.export.gguf import export_gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real(name, *a),
    )
    with pytest.raises(UserError, match=r"--outtype q4_k_m .*make install"):
        export_gguf(str(tiny), tmp_path / "o.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_quantiser_failure_leaves_nothing(tiny, tmp_path, monkeypatch):
    """llama.cpp's quantiser failing (a full disk, say) is one error naming the output; the f16
    source and the partial output are removed."""
    import openchatkit.inference.llamacpp as llamacpp
    from openchatkit.export.gguf import export_gguf
    from openchatkit.fileio import OutputError

    def fail(src, dst, ftype, threads=None):
        Path(dst).write_bytes(b"partial")
        raise RuntimeError("llama.cpp's quantiser failed: No space left on device")

    monkeypatch.setattr(llamacpp, "quantize_file", fail)
    with pytest.raises(OutputError, match=r"cannot write .*o\.gguf: .*No space left"):
        export_gguf(str(tiny), tmp_path / "o.gguf", "q6_k")
    assert list(tmp_path.iterdir()) == []


def test_cli_names_the_types_and_says_when_llama_cpp_fell_back(tiny, tmp_path, in_process):
    """The script's summary line tallies the 2-D weight types; rows that are not whole 256-weight
    blocks (hidden 320 here, 576 in SmolLM2-135M) get a legacy type, and it says so."""
    script = "tools/export_gguf.py"
    proc = in_process(script, "--model", tiny, "--out", tmp_path / "a.gguf", "--outtype", "q6_k")
    assert proc.returncode == 0, proc.stderr
    assert "(2-D weights: 15 Q6_K)" in proc.stderr and "legacy" not in proc.stderr
    odd = make_tiny_llama(tmp_path / "odd", hidden=320, ffn=512)
    proc = in_process(script, "--model", odd, "--out", tmp_path / "b.gguf", "--outtype", "q6_k")
    assert proc.returncode == 0, proc.stderr
    assert "Q8_0" in proc.stderr and "Q6_K" in proc.stderr  # ffn_down's rows are 512: Q6_K
    assert "legacy type where rows are not whole 256-weight k-quant blocks" in proc.stderr
