"""The k-quant export types (`--outtype q6_k | q5_k_m | q4_k_m`), made by llama.cpp's own quantiser
from the kit's f16 export (openchatkit/export/gguf.py, `write_llamacpp_quant`).

A tiny random Llama whose rows are whole 256-weight k-quant super-blocks (hidden 256, feed-forward
512), so every 2-D weight takes a k-quant type rather than llama.cpp's fallback for short rows.

Logit ceilings, reasoned as in test_gguf_export.py (relative to the largest |logit| of a step,
2L + 2 matrix products between the embedding and the logits, each adding its weights' and 8-bit
activations' (1/254) relative error): a rule of thumb, not a proof, since the errors of
successive products need not simply add; with weights N(0, 1/sqrt(hidden)) they hold with 1.5x
(q4_k_m) and 2.3x (q6_k) to spare, and each is checked against a floor of 0.01 that an f16 file
(0.0016 here) does not reach, so a file that skipped the quantiser fails:
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
import os
import signal
import sys
import threading
import time
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_tiny_gguf_source) -> Path:
    """A tiny random Llama, weights N(0, STD), with the embedded model's tokenizer."""
    folder = tmp_path_factory.mktemp("kquant") / "hf"
    return make_tiny_gguf_source(folder, layers=LAYERS, hidden=256, ffn=512, std=STD)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory, gguf_exports):
    return gguf_exports(tiny, tmp_path_factory.mktemp("kquant-out"), "tiny")


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
    assert worst > 0.01  # quantised: the f16 source's own error is 0.0016


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
    assert seen == types  # every row is whole 256-weight blocks: no legacy fallback
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


LLAMA_DISK_FULL = "llama_model_quantize: failed to quantize: basic_ios::clear: iostream error"


@pytest.mark.parametrize("free, needle", [(0, "no space left on its device"), (1 << 30, "")])
def test_quantiser_failure_leaves_nothing(tiny, tmp_path, monkeypatch, free, needle):
    """llama.cpp's quantiser failing is one error naming the output, with llama.cpp's reason (a
    full disk reads as an iostream error there, so the free space is looked at); the f16 source
    and the partial output are removed."""
    import collections

    import openchatkit.export.gguf as export_module
    import openchatkit.export.gguf_quantize as quantize_module
    from openchatkit.export.gguf import export_gguf
    from openchatkit.fileio import OutputError

    def fail(src, dst, ftype, threads=None):
        assert Path(src).stat().st_size > 1 << 20  # the f16 source was written
        Path(dst).write_bytes(b"partial")
        raise RuntimeError(LLAMA_DISK_FULL)

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(quantize_module, "quantize_gguf", fail)
    monkeypatch.setattr(export_module.shutil, "disk_usage", lambda p: usage(1 << 40, 0, free))
    with pytest.raises(OutputError) as err:
        export_gguf(str(tiny), tmp_path / "o.gguf", "q6_k")
    message = str(err.value)
    assert message.startswith(f"cannot write {tmp_path / 'o.gguf'}: ") and needle in message
    assert "iostream error" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_writing_the_f16_source_names_the_output(tiny, small_disk):
    from openchatkit.export.gguf import export_gguf
    from openchatkit.fileio import OutputError

    out = small_disk / "o.gguf"  # 1 MiB: the tiny model's f16 source (25 MB) does not fit
    with pytest.raises(OutputError, match=rf"^cannot write {out}: .*(space|full)"):
        export_gguf(str(tiny), out, "q4_k_m")
    assert list(small_disk.iterdir()) == []


def _sleeper(tmp_path: Path) -> list[str]:
    """A stand-in quantiser child: writes its pid, then sleeps a minute."""
    pid_file = tmp_path / "child.pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    return [sys.executable, "-c", code], pid_file


def _interrupt_when(path: Path) -> threading.Thread:
    """Ctrl-C to the main thread once `path` exists (as a terminal sends SIGINT)."""

    def run():
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_stops_the_quantiser_child_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    """Ctrl-C during quantisation stops the export at once (the child is killed, where
    llama.cpp run in this process would drop the KeyboardInterrupt in its log callback and
    finish), and neither the f16 source nor a partial output stays."""
    import openchatkit.export.gguf_quantize as quantize_module
    from openchatkit.export.gguf import export_gguf

    cmd, pid_file = _sleeper(tmp_path)
    monkeypatch.setattr(quantize_module, "child_command", lambda *a: cmd)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _interrupt_when(pid_file)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        export_gguf(str(tiny), out_dir / "o.gguf", "q4_k_m")
    assert time.monotonic() - start < 30  # not the sleeper's minute
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped
    assert list(out_dir.iterdir()) == []


def test_quantiser_child_runs_llama_cpp_and_reports_its_error(tmp_path):
    """The real child: a file that is not GGUF is refused with llama.cpp's reason, in one line."""
    from openchatkit.export.gguf_quantize import quantize_gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="failed to quantize") as err:
        quantize_gguf(bad, tmp_path / "o.gguf", "Q6_K", threads=1)
    assert "\n" not in str(err.value)


def test_cli_names_the_types_and_says_when_llama_cpp_fell_back(
    tiny, tmp_path, in_process, make_tiny_gguf_source
):
    """The script's summary line tallies the 2-D weight types; rows that are not whole 256-weight
    blocks (hidden 320 here, 576 in SmolLM2-135M) get a legacy type, and it says so."""
    script = "tools/export_gguf.py"
    proc = in_process(script, "--model", tiny, "--out", tmp_path / "a.gguf", "--outtype", "q6_k")
    assert proc.returncode == 0, proc.stderr
    assert "(2-D weights: 15 Q6_K)" in proc.stderr and "legacy" not in proc.stderr
    odd = make_tiny_gguf_source(tmp_path / "odd", layers=LAYERS, hidden=320, ffn=512, std=STD)
    proc = in_process(script, "--model", odd, "--out", tmp_path / "b.gguf", "--outtype", "q6_k")
    assert proc.returncode == 0, proc.stderr
    assert "Q8_0" in proc.stderr and "Q6_K" in proc.stderr  # ffn_down's rows are 512: Q6_K
    assert "legacy type where rows are not whole 256-weight k-quant blocks" in proc.stderr
