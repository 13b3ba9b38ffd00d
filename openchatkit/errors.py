"""The one error type for mistakes a user can fix (a bad flag, a missing file, no network).

Scripts turn it into one line on stderr and exit code 2 (see `openchatkit.cli.run_main`);
anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input: the message names the flag or file and says what to do."""
