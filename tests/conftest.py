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
    """cli.REPO, cli.user_env(**extra), cli.run(script, *args, env=, stdin=, timeout=),
    cli.run_here(script, *args, ...) (below) and cli.assert_one_line_error(proc, *needles,
    usage_first=False)."""
    return types.SimpleNamespace(
        REPO=REPO,
        user_env=user_env,
        run=run,
        run_here=run_here,
        assert_one_line_error=assert_one_line_error,
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


def run_here(
    script: str | Path,
    *args: object,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    base_env: dict[str, str] | None = None,
    log_level: str = "INFO",
) -> subprocess.CompletedProcess:
    """`script`'s `main(argv)` in this process, the way its `__main__` block runs it (through
    `openchatkit.cli.run_main`, from the repository root), stdout and stderr captured: a
    CompletedProcess, as `run` gives for a real process. It saves the interpreter start (~3
    CPU-s importing torch and transformers, ~8 for a trainer run). Use it where a script's
    process is not what a test checks: each test file keeps real processes for the CLI
    behaviour it promises, and tests/test_bad_input.py runs every refusal as a process.

    The call's environment: `base_env` (default: this process's) with `env` set and `unset`
    removed; OMP_NUM_THREADS in it sets torch's thread count, as in a new process. Afterwards the
    environment, working directory and loguru's sink are given back, and, when torch or numpy
    was loaded, torch's thread count and the random states of torch, numpy and Python, so later
    tests see no change. argparse's exits become the exit code; `log_level` is the one the script
    gives run_main. A process group left open fails the call (it would leak into the rest of the
    session). Nothing is imported here that the script would not import: a refusal made before
    torch is imported can be checked as such (tests/test_refusals_before_torch.py)."""
    import contextlib
    import io
    import random

    from openchatkit.cli import run_main

    module = load_script(script)
    argv = [str(a) for a in args]
    call_env = dict(os.environ if base_env is None else base_env)
    call_env.update(env or {})
    for key in unset:
        call_env.pop(key, None)
    saved_env, cwd = dict(os.environ), os.getcwd()
    torch, np = sys.modules.get("torch"), sys.modules.get("numpy")
    py_state = random.getstate()
    torch_state = (torch.get_num_threads(), torch.get_rng_state()) if torch else None
    np_state = np.random.get_state() if np else None
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(call_env)
        os.chdir(REPO)
        threads = call_env.get("OMP_NUM_THREADS", "")
        if torch is not None and threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run_main(lambda: module.main(argv), Path(script).name, log_level)
            except SystemExit as exit_:  # argparse (--help, usage errors) and sys.exit(...)
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:  # sys.exit("message"): the interpreter prints it and exits 1
                    print(exit_.code, file=sys.stderr)
                    code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)
        random.setstate(py_state)
        if torch_state is not None:
            torch.set_num_threads(torch_state[0])
            torch.set_rng_state(torch_state[1])
        if np_state is not None:
            np.random.set_state(np_state)
        _reset_loguru()
    dist = sys.modules.get("torch.distributed")  # not imported: no group can exist
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # for this process (the rest of the session)
        raise AssertionError(f"{script} {argv} left a process group:\n{err.getvalue()}")
    return subprocess.CompletedProcess([str(script), *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def in_process():
    """`run_here` (above) for test modules: in_process(script, *args, env=, unset=, base_env=,
    log_level=)."""
    return run_here


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
