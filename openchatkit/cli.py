"""Shared plumbing for the command-line scripts: one-line errors and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable

from openchatkit.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_main(main: Callable[[], int | None], prog: str | None = None) -> int:
    """Run a script's `main` and map user errors to one line on stderr and exit code 2.

    A `UserError` (or an `OSError` about a file the user named, which the script re-raises as
    `UserError`) never shows a traceback; Ctrl-C exits 130 quietly.
    """
    name = prog or sys.argv[0].rsplit("/", 1)[-1]
    try:
        return int(main() or 0)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
