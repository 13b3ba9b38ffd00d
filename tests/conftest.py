"""Helpers every test folder shares: run a script as a user runs it, and check a user error.

They come as the `cli` fixture because under `--import-mode=importlib` a test module cannot
import a conftest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell on a small CPU machine: this process's variables, one
    BLAS thread, no tokenizers thread pool; `extra` adds or overrides variables."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run(
    script: str | Path,
    *args: object,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`python script *args` from the repository root, output captured as text. `args` go
    through str(); `env` is the whole environment (default: user_env()); `stdin` is fed to the
    script (default: none, the script inherits this process's stdin)."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=REPO,
        env=user_env() if env is None else env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess, *needles: str, usage_first: bool = False
) -> None:
    """A script refused its input as the project's scripts do (`openchatkit.cli.run_main`):
    exit code 2, exactly one line on stderr holding every needle, no traceback.
    usage_first=True also accepts argparse's own errors: its usage first, then that one line."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if usage_first and len(lines) > 1:
        assert lines[0].startswith("usage: "), proc.stderr
        lines = lines[-1:]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def cli() -> types.SimpleNamespace:
    """cli.REPO, cli.user_env(**extra), cli.run(script, *args, env=, stdin=, timeout=) and
    cli.assert_one_line_error(proc, *needles, usage_first=False)."""
    return types.SimpleNamespace(
        REPO=REPO, user_env=user_env, run=run, assert_one_line_error=assert_one_line_error
    )
