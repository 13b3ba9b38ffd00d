"""Shared plumbing for the command-line scripts: one-line errors and exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from openchatkit.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(level: str = "INFO") -> None:
    """Library logs (loguru) to stderr at `level`; OPENCHATKIT_LOG_LEVEL overrides it.

    loguru's default handler prints DEBUG lines, which would drown a CLI's own output.
    """
    from loguru import logger

    logger.remove()
    logger.add(
        sys.stderr,
        level=os.environ.get("OPENCHATKIT_LOG_LEVEL", level).upper(),
        format="<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {message}",
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
