"""`inference/serve.py` bad flags: one line naming the flag or file, exit 2, no traceback, before
any model is loaded; and the warning for a public address without an API key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parents[2] / "inference" / "serve.py"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SERVE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--port", "70000"], "--port"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-tokens", "300", "--max-tokens-cap", "200"], "--max-tokens-cap"),
        (["--max-queue", "0"], "--max-queue"),
        (["--api-key", " "], "--api-key"),
        (["--moderation-threshold", "0.5"], "--moderation"),
        (["--backend", "llama.cpp", "--model", "/tmp"], "--backend llama.cpp"),
        (["--ctx-size", "0"], "--ctx-size"),
        (["--retrieval", "/nonexistent/index"], "/nonexistent/index"),
        (["--feedback", "/nonexistent/dir/fb.jsonl"], "/nonexistent/dir"),
        (["--feedback", "/tmp"], "--feedback"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_flags_one_line(args, needle):
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_public_host_without_key_warns(tmp_path):
    # A missing model makes it stop right after the warning, before anything is served.
    proc = run("--host", "0.0.0.0", "--model", str(tmp_path / "none"))
    assert "warning: listening on 0.0.0.0 without --api-key" in proc.stderr
    assert proc.returncode == 2
