"""llama.cpp's quantiser (openchatkit/inference/llamacpp.py `quantize_file`) run in a child process.

Why a child: llama.cpp calls back into Python for every log line, and ctypes drops a
KeyboardInterrupt raised in such a callback, so in this process the quantiser would run to the end
through a Ctrl-C (minutes for a 7B model) and print a traceback. A child can be killed:
`subprocess.run` kills it when the wait is interrupted, and the exporter's cleanup removes what it
had written. The child imports only the binding (no torch), started from the folder that holds the
`openchatkit` package so that no module in the user's working directory can stand in for it.

    python -m openchatkit.export.gguf_quantize SRC.gguf DST.gguf Q4_K_M THREADS   # what it runs
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def child_command(src: Path, dst: Path, ftype: str, threads: int) -> list[str]:
    """The child's command line (absolute paths: it runs from PACKAGE_PARENT)."""
    args = [os.fsdecode(Path(p).resolve()) for p in (src, dst)]
    return [sys.executable, "-m", __name__, *args, ftype, str(threads)]


def quantize_gguf(src: Path, dst: Path, ftype: str, threads: int | None = None) -> None:
    """Quantise GGUF `src` into `dst` as llama.cpp file type `ftype` ("Q4_K_M") in a child
    process. RuntimeError with llama.cpp's reason when it fails; KeyboardInterrupt (the child
    killed) when interrupted."""
    from openchatkit.inference.llamacpp import default_threads

    cmd = child_command(src, dst, ftype, threads or default_threads())
    proc = subprocess.run(cmd, cwd=PACKAGE_PARENT, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:  # stderr: llama.cpp's reason, then quantize_file's own line
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError("; ".join(lines) or f"llama.cpp's quantiser exited {proc.returncode}")


def main(argv: list[str]) -> int:
    from openchatkit.inference.llamacpp import quantize_file

    src, dst, ftype, threads = argv
    try:
        quantize_file(Path(src), Path(dst), ftype, int(threads))
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
