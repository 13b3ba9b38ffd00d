"""Download OIG-moderation (ontocord/OIG-moderation, the safety data for the moderation model)
into data/OIG-moderation/files/.

The dataset is gated: accept its terms at https://huggingface.co/datasets/ontocord/OIG-moderation
and set a token (`hf auth login`, or HF_TOKEN=...) first.

    python data/OIG-moderation/prepare.py
    python data/OIG-moderation/prepare.py --files 'OIG_safety_v0.2*' --dest /big/disk/mod

Downloads resume after an interruption; files already complete are skipped; `.gz` files are
decompressed and a file appears under its final name only when whole.
"""

import sys
from pathlib import Path

from openchatkit.cli import run_main
from openchatkit.cli.download import download_parser, run_download

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = download_parser(__doc__, "ontocord/OIG-moderation", HERE / "files", "*.jsonl*")
    return run_download(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
