"""Text from elsewhere (a model's answer, a loaded chat, a retrieved passage) shown on a terminal
as text, never as terminal commands.

A terminal acts on control characters: ESC starts sequences that clear the screen, set the
window title or, on terminals that allow OSC 52, write the clipboard; a carriage return
overwrites what was shown. `escape_controls` replaces every C0 control but newline and tab,
DEL, and every C1 control (U+0080-U+009F, which some terminals read as ESC + a letter) with a
visible `\\xNN`; `for_stream` does so only when the stream is a terminal, so a pipe or a file
keeps the exact text.
"""

from __future__ import annotations

import re
from typing import TextIO

_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """`text` with control characters (not newline or tab) written as `\\xNN`."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def is_terminal(stream: TextIO) -> bool:
    """True when `stream` is a terminal (False for files, pipes and StringIO)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def for_stream(text: str, stream: TextIO) -> str:
    """`text` as it may be written to `stream`: escaped when that is a terminal."""
    return escape_controls(text) if is_terminal(stream) else text
