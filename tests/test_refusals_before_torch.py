"""A user's mistake is refused before torch is imported: a user waits a fraction of a second for
the one-line error instead of seconds of importing torch and transformers (and the bad-input
table in tests/test_bad_input.py, which runs every case as a process, stays fast).

One interpreter runs every case below as `__main__` in turn and reports, after each, which of
the heavy modules (torch, transformers, peft, matplotlib, safetensors.torch) are in
`sys.modules`; the exit code and the message are checked too (the full "one line, exit 2,
nothing written" contract of the same rows is the table's). Inputs are made without torch: a
folder with a config.json, a hand-written truncated safetensors file, a damaged moderation
config, a layer-sharded manifest of an unknown architecture."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "matplotlib", "safetensors.torch")
DRIVER = r"""
import json, runpy, sys
out, cases, heavy = [], json.loads(sys.argv[1]), json.loads(sys.argv[2])
for script, args in cases:
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out.append([script, code, [m for m in heavy if m in sys.modules]])
print(json.dumps(out))
"""


def run_in_one_interpreter(cases: list, cli, **env: str) -> tuple[list, list[str]]:
    """Every (script, args) of `cases` as `__main__` in one interpreter, from the repository
    root: ([script, exit code, heavy modules imported so far] per case, the stderr lines)."""
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases), json.dumps(HEAVY)],
        cwd=cli.REPO,
        env=cli.user_env(HF_HUB_OFFLINE="1", **env),
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = proc.stderr.strip().splitlines()
    assert len(results) == len(cases) == len(errors), proc.stderr
    return results, errors


def test_path_typos_are_refused_before_torch_is_imported(tmp_path, cli):
    model = tmp_path / "model"  # passes the cheap "is an HF folder" checks
    model.mkdir()
    (model / "config.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    nope = str(tmp_path / "nope")
    cases = [
        ("inference/bot.py", ["--model", nope]),
        ("inference/bot.py", ["--model", str(model), "--adapter", str(empty)]),
        ("inference/bot.py", ["--model", str(model), "--retrieval", nope]),
        ("inference/bot.py", ["--model", str(model), "--moderation", nope]),
        ("inference/serve.py", ["--model", nope]),
        ("inference/serve.py", ["--model", str(model), "--adapter", str(empty)]),
        ("inference/serve.py", ["--model", str(model), "--moderation", nope]),
        ("inference/serve.py", ["--model", str(model), "--retrieval", nope]),
        ("tools/merge_lora.py", ["--base", nope, "--adapter", str(empty), "--save-path", nope]),
        (
            "tools/merge_lora.py",
            ["--base", str(model), "--adapter", str(empty), "--save-path", str(tmp_path / "o")],
        ),
    ]
    results, errors = run_in_one_interpreter(cases, cli)
    for (script, args), (_, code, heavy), line in zip(cases, results, errors, strict=True):
        assert code == 2, (script, args, line)
        assert "torch" not in heavy, f"{script} {args} imported torch before refusing: {line}"
    assert not (tmp_path / "o").exists()


def truncated_safetensors(path) -> None:
    """A safetensors file whose header describes 64 bytes of data that are not there."""
    header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 10)


def test_bad_flags_and_damaged_inputs_are_refused_before_heavy_imports(tmp_path, cli):
    """Flags a CPU host cannot honour, damaged weights, wrong architectures, unwritable
    outputs: refused before torch, transformers, peft or matplotlib is imported."""
    w = tmp_path
    hf = w / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    truncated = w / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text(json.dumps({"model_type": "llama"}))
    truncated_safetensors(truncated / "model.safetensors")
    (w / "file").write_text("x")
    moderation = w / "moderation"
    moderation.mkdir()
    (moderation / "moderation_classifier.json").write_text("{not json")
    metrics = w / "metrics.jsonl"
    metrics.write_text(
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
    nope, file_x = str(w / "nope"), str(w / "file" / "x")
    cases = [  # (script, args, words of its one stderr line)
        ("inference/bot.py", ["--model", str(hf), "--device", "cuda"], ["--device cuda"]),
        ("inference/bot.py", ["--model", str(hf), "--load-in-8bit"], ["--load-in-8bit"]),
        ("inference/bot.py", ["--model", str(hf), "-g", "0:10"], ["-g/--gpu-vram"]),
        (
            "inference/bot.py",
            ["--model", str(truncated), "--prompt", "hi"],
            ["--model", "truncated", "model.safetensors"],
        ),
        (
            "tools/convert_to_hf.py",
            ["--ckpt-path", str(bert), "--save-path", str(w / "o1")],
            ["--ckpt-path", "'bert'"],
        ),
        (
            "tools/convert_from_hf_gptneox.py",
            ["--model-name", str(hf), "--save-path", str(w / "o2")],
            ["llama"],
        ),
        ("tools/export_lora.py", ["--ckpt-path", nope, "--save-path", nope], ["not a folder"]),
        ("tools/export_gguf.py", ["--model", nope, "--out", str(w / "x.gguf")], ["--model"]),
        (
            "inference/moderate.py",
            ["hi", "--model", str(moderation)],
            ["moderation_classifier.json", "cannot read"],
        ),
        ("training/train_moderation_classifier.py", ["--output", file_x], ["not a folder"]),
        ("evaluation/eval.py", ["--model", str(hf), "--output", file_x], ["--output"]),
        ("tools/plot_metrics.py", [str(metrics), "--output", file_x + ".png"], ["not a folder"]),
    ]
    results, errors = run_in_one_interpreter(
        [c[:2] for c in cases], cli, CUDA_VISIBLE_DEVICES="", OPENCHATKIT_HOME=str(w / "home")
    )
    for (script, args, needles), (_, code, heavy), line in zip(cases, results, errors, strict=True):
        assert code == 2, (script, args, line)
        assert all(n in line for n in needles), (script, args, line)
        assert heavy == [], f"{script} {args} imported {heavy} before refusing: {line}"
    assert sorted(p.name for p in w.iterdir()) == sorted(
        ["hf", "truncated", "file", "moderation", "metrics.jsonl", "bert-sharded"]
    )


def test_the_driver_reports_a_heavy_import(tmp_path, cli):
    """The checks above can fail: a script that imported torch is reported (a stand-in module
    under torch's name, so this test itself stays light)."""
    script = tmp_path / "s.py"
    script.write_text("import sys, types\nsys.modules['torch'] = types.ModuleType('torch')\n")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([[str(script), []]]), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout) == [[str(script), 0, ["torch"]]]
