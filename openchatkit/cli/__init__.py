"""The command-line edge of the kit: one-line errors, exit codes and logging for every script,
and (in the submodules) the argument parsers that several scripts share:
`openchatkit.cli.train` (the trainer's flags), `openchatkit.cli.convert` (weight converters and
`pretrained/*/prepare.py`) and `openchatkit.cli.download` (`data/*/prepare.py`).

Only scripts import this package; the rest of the library never parses arguments."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from openchatkit.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    """Library logs (loguru) to stderr at `level`; OPENCHATKIT_LOG_LEVEL overrides it.

    loguru's default handler prints DEBUG lines, which would drown a CLI's own output. In a
    distributed job (`rank` given) every line names its rank, and ranks other than 0 log only
    warnings and errors, so the step lines come once.
    """
    from loguru import logger

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


def run_main(
    main: Callable[[], int | None], prog: str | None = None, log_level: str = "INFO"
) -> int:
    """Run a script's `main` and map user errors to one line on stderr and exit code 2.

    A `UserError` (or an `OSError` about a file the user named, which the script re-raises as
    `UserError`) never shows a traceback; Ctrl-C exits 130 quietly.
    """
    name = prog or sys.argv[0].rsplit("/", 1)[-1]
    setup_logging(log_level)
    try:
        return int(main() or 0)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
