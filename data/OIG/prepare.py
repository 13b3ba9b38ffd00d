"""Download the OIG corpus (laion/OIG, the `unified_*` files, ~40 GB compressed, ~170 GB
decompressed) into data/OIG/files/*.jsonl.

    python data/OIG/prepare.py                              # every unified_* file
    python data/OIG/prepare.py --files 'unified_chip2*'     # one file, ~100 MB
    python data/OIG/prepare.py --dest /big/disk/OIG         # somewhere else

Downloads resume after an interruption; files already complete are skipped; `.gz` files are
decompressed and a file appears under its final name only when whole. Train on them with
`--task-name data/OIG/files` (a folder) or a weighted list of files.
"""

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.download import download_parser, run_download

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = download_parser(__doc__, "laion/OIG", HERE / "files", "unified_*")
    return run_download(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
