"""A mistyped path is refused before torch is imported: a user waits a fraction of a second for
the one-line error instead of seconds of importing torch and transformers (and the bad-input
table in tests/test_bad_input.py, which runs every case as a process, stays fast).

One interpreter runs every case below as `__main__` in turn and reports, after each, whether
`torch` is in `sys.modules`; the exit code and the message are checked too (the full "one line,
exit 2, nothing written" contract of the same rows is the table's)."""

from __future__ import annotations

import json
import subprocess
import sys

DRIVER = r"""
import json, runpy, sys
out = []
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out.append([script, code, "torch" in sys.modules])
print(json.dumps(out))
"""


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
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)],
        cwd=cli.REPO,
        env=cli.user_env(HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = proc.stderr.strip().splitlines()
    assert len(results) == len(cases) == len(errors), proc.stderr
    for (script, args), (_, code, torch_loaded), line in zip(cases, results, errors, strict=True):
        assert code == 2, (script, args, line)
        assert not torch_loaded, f"{script} {args} imported torch before refusing: {line}"
    assert not (tmp_path / "o").exists()
