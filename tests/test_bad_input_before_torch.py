"""Scripts refuse common bad input before importing torch, transformers, peft or matplotlib: a
user's typo is told in a fraction of a second, not after seconds of imports (and the subprocess
table of tests/test_bad_input.py stays cheap).

Each case runs its script as a user does, through a tiny wrapper that runs it as `__main__` and
then records which heavy modules the process imported. The usual contract (exit 2, one line
naming the flag, no traceback) is checked too. Inputs are made without torch: a folder with a
config.json, a hand-written truncated safetensors file, a damaged moderation config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "matplotlib", "safetensors.torch")

# Runs argv[2] as __main__ (its folder first on sys.path, as `python script` does), then
# writes {"code", "heavy"} to argv[1] on the way out.
WRAPPER = f"""
import json, os, runpy, sys
report, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
def write(code):
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    with open(report, "w") as f:
        json.dump({{"code": code, "heavy": heavy}}, f)
try:
    runpy.run_path(script, run_name="__main__")
    write(0)
except SystemExit as err:
    write(err.code if isinstance(err.code, int) else 1)
    raise
"""


def truncated_safetensors(path: Path) -> None:
    """A safetensors file whose header describes 64 bytes of data that are not there."""
    header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 10)


def hf_folder(folder: Path, model_type: str = "llama") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def case_inputs(w: Path) -> list[tuple[list[str], tuple[str, ...], dict[str, str]]]:
    """(script and arguments, needles of the one stderr line, extra environment) per case."""
    hf = hf_folder(w / "hf")
    truncated = hf_folder(w / "truncated")
    truncated_safetensors(truncated / "model.safetensors")
    (w / "file").write_text("x")
    moderation = w / "moderation"
    moderation.mkdir()
    (moderation / "moderation_classifier.json").write_text("{not json")
    (w / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 5.0})
        + "\n"
    )
    bert = w / "bert-sharded"
    bert.mkdir()
    (bert / "manifest.json").write_text(
        json.dumps(
            {
                "format": "openchatkit-layer-sharded",
                "version": 1,
                "architecture": "bert",
                "num_layers": 1,
                "dtype": "float32",
                "tie_word_embeddings": False,
            }
        )  # fmt: skip
    )
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    return [
        (["inference/bot.py", "--model", str(hf), "--device", "cuda"], ("--device cuda",), no_gpu),
        (["inference/bot.py", "--model", str(hf), "--load-in-8bit"], ("--load-in-8bit",), no_gpu),
        (
            ["inference/bot.py", "--model", str(truncated), "--prompt", "hi"],
            ("--model", "truncated", "model.safetensors"),
            no_gpu,
        ),
        (
            ["tools/convert_to_hf.py", "--ckpt-path", str(bert), "--save-path", str(w / "o1")],
            ("--ckpt-path", "'bert'"),
            {},
        ),
        (
            [
                "tools/convert_from_hf_gptneox.py",
                "--model-name",
                str(hf),
                "--save-path",
                str(w / "o2"),
            ],
            ("llama",),
            {},
        ),  # fmt: skip
        (
            ["tools/export_lora.py", "--ckpt-path", str(w / "nope"), "--save-path", str(w / "o3")],
            ("not a folder",),
            {},
        ),
        (
            ["tools/export_gguf.py", "--model", str(w / "nope"), "--out", str(w / "x.gguf")],
            ("--model", "no such folder"),
            {},
        ),
        (
            ["inference/moderate.py", "hi", "--model", str(moderation)],
            ("moderation_classifier.json", "cannot read"),
            {},
        ),
        (
            ["training/train_moderation_classifier.py", "--output", str(w / "file")],
            ("not a folder",),
            {},
        ),
        (
            ["evaluation/eval.py", "--model", str(hf), "--output", str(w / "file" / "x")],
            ("--output",),
            {},
        ),
        (
            [
                "tools/plot_metrics.py",
                str(w / "metrics.jsonl"),
                "--output",
                str(w / "file" / "p.png"),
            ],
            ("--output", "not a folder"),
            {},
        ),  # fmt: skip
    ]


def test_bad_input_is_refused_before_heavy_imports(cli, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    cases = case_inputs(work)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    failures = []
    for i, (args, needles, extra) in enumerate(cases):
        report = tmp_path / f"report{i}.json"
        env = cli.user_env(HF_HUB_OFFLINE="1", OPENCHATKIT_HOME=str(tmp_path / "home"), **extra)
        proc = cli.run(wrapper, report, *args, env=env, stdin="")
        cli.assert_one_line_error(proc, *needles)
        heavy = json.loads(report.read_text())["heavy"]
        if heavy:
            failures.append(f"{' '.join(args[:2])} ... imported {heavy}: {proc.stderr.strip()}")
    assert not failures, "\n".join(failures)
    assert not (work / "o1").exists() and not (work / "o2").exists()
    assert not (work / "o3").exists() and not (work / "x.gguf").exists()


def test_the_wrapper_sees_a_heavy_import(tmp_path):
    """The check above can fail: a script that imported torch is reported (a stand-in module
    under torch's name, so this test itself stays light)."""
    import subprocess

    script = tmp_path / "s.py"
    script.write_text("import sys, types\nsys.modules['torch'] = types.ModuleType('torch')\n")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    report = tmp_path / "r.json"
    subprocess.run([sys.executable, str(wrapper), str(report), str(script)], check=True)
    assert json.loads(report.read_text()) == {"code": 0, "heavy": ["torch"]}
