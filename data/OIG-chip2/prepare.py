"""Download OIG's chip2 subset (laion/OIG `unified_chip2.jsonl`, ~100 MB, about 210k
instruction dialogues) into data/OIG-chip2/files/.

    python data/OIG-chip2/prepare.py
    python data/OIG-chip2/prepare.py --dest /big/disk/chip2

Then train on it with `--task-name data/OIG-chip2/files`. Downloads resume after an
interruption and a complete file is skipped on a rerun.
"""

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.download import download_parser, run_download

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = download_parser(__doc__, "laion/OIG", HERE / "files", "unified_chip2.jsonl*")
    return run_download(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
