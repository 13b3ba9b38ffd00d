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


_SCRIPTS: dict[Path, types.ModuleType] = {}


def load_script(script: str | Path) -> types.ModuleType:
    """A script under the repository imported as a module (once per session), so that its
    `main(argv)` can run in this process. Its import-time changes to os.environ are undone."""
    path = (REPO / script).resolve()
    if path not in _SCRIPTS:
        import importlib.util

        saved = dict(os.environ)
        try:
            spec = importlib.util.spec_from_file_location(f"_script_{len(_SCRIPTS)}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _SCRIPTS[path] = module
    return _SCRIPTS[path]


@pytest.fixture
def in_process(capsys, monkeypatch):
    """in_process(script, *args, env=None, unset=(), log_level="INFO") runs `script`'s `main(argv)` in this
    process the way its `__main__` block does (through `openchatkit.cli.run_main`, from the
    repository root) and returns a CompletedProcess with the exit code and the captured
    stdout and stderr, for `assert_one_line_error`. `env` sets variables, `unset` removes
    them, for this call only; `log_level` is the one the script gives run_main. A bad-input check then costs no interpreter start; the
    subprocess table in tests/test_bad_input.py proves the contract for the real process."""
    from openchatkit.cli import run_main

    def call(script, *args, env=None, unset=(), log_level="INFO"):
        for key in unset:
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(REPO)
        module = load_script(script)
        argv = [str(a) for a in args]
        capsys.readouterr()
        try:
            code = run_main(lambda: module.main(argv), Path(script).name, log_level)
        except SystemExit as exit_:  # argparse (--help, usage errors) and sys.exit(...)
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"): the interpreter prints it and exits 1
                print(exit_.code, file=sys.stderr)
                code = 1
        finally:
            _reset_loguru()
        out, err = capsys.readouterr()
        dist = sys.modules.get("torch.distributed")  # not imported: no group can exist
        if dist is not None and dist.is_available() and dist.is_initialized():  # got too far
            dist.destroy_process_group()  # for this process (the rest of the session)
            raise AssertionError(f"{script} {argv} started a process group in-process:\n{err}")
        return subprocess.CompletedProcess([str(script), *argv], code, out, err)

    return call


def _reset_loguru() -> None:
    """run_main points loguru at the sys.stderr of its call (here, pytest's capture); give it
    back a sink that writes to whatever sys.stderr is when a line is logged."""
    from loguru import logger

    logger.remove()
    logger.add(lambda message: sys.stderr.write(message))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs for disk-full cases (needs root and mount rights, as in the project's container)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): disk-full case")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
