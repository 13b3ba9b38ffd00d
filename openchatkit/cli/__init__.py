"""The command-line edge of the kit: one-line errors, exit codes and logging for every script,
and (in the submodules) the argument parsers that several scripts share:
`openchatkit.cli.train` (the trainer's flags), `openchatkit.cli.convert` (weight converters and
`pretrained/*/prepare.py`) and `openchatkit.cli.download` (`data/*/prepare.py`).

Only scripts import this package; the rest of the library never parses arguments."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from openchatkit.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell tool killed by it reports


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    """Library logs (loguru) to stderr at `level`; OPENCHATKIT_LOG_LEVEL overrides it.

    loguru's default handler prints DEBUG lines, which would drown a CLI's own output. In a
    distributed job (`rank` given) every line names its rank, and ranks other than 0 log only
    warnings and errors, so the step lines come once.
    """
    import logging

    from loguru import logger

    # bitsandbytes (imported by transformers when a model loads) warns on CPU at import that an
    # optional `kernels` package is missing: a second stderr line before any real message.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    level = os.environ.get("OPENCHATKIT_LOG_LEVEL", level).upper()
    where = ""
    if rank is not None:
        where = f"rank {rank} | "
        if rank != 0:
            level = "WARNING"
    logger.remove()
    logger.add(
        sys.stderr,
        level=level,
        format="<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | "
        + where
        + "{message}",
    )


class _OneLineParser(argparse.ArgumentParser):
    """Stands in for `ArgumentParser.error` under `run_main`: one line, no usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _quiet_broken_pipe() -> int:
    """stdout was closed by the reader (`... | head`): stop quietly, as Unix tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def run_main(
    main: Callable[[], int | None], prog: str | None = None, log_level: str = "INFO"
) -> int:
    """Run a script's `main` and map user errors to one line on stderr and exit code 2.

    A `UserError` never shows a traceback, nor does an argparse error (one line, no usage
    block), nor an `OSError` about a named file that escaped the script's own checks (one line
    naming the file, exit 2: a path, permission or full disk the user can fix). stdout closed
    by its reader exits 141 silently; Ctrl-C exits 130 quietly.
    """
    name = prog or sys.argv[0].rsplit("/", 1)[-1]
    setup_logging(log_level)
    error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _OneLineParser.error  # type: ignore[method-assign]
    try:
        return int(main() or 0)
    except UserError as err:
        print(f"{name}: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as err:
        if err.filename is None:
            raise
        print(f"{name}: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        argparse.ArgumentParser.error = error  # type: ignore[method-assign]


def _one_line(text: str) -> str:
    """A message that would span lines (a library's error text inside ours) joined into one."""
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
