"""Download the original OpenChatKit's prebuilt Wikipedia retrieval index (and its query embedder).

Fetches the Hub dataset ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index
(`knn.index`: faiss index of Contriever-msmarco embeddings of 3-sentence Wikipedia snippets, and
`wikipedia-en-sentences.parquet`) into `files/` next to this script, with a progress bar per
file; an interrupted download resumes where it stopped when run again. The query embedder
facebook/contriever-msmarco goes to the Hugging Face cache so searching works offline later.
Tens of GB: check the free disk space first.

    python data/wikipedia-3sentence-level-retrieval-index/prepare.py
    python data/wikipedia-3sentence-level-retrieval-index/prepare.py --output /big/disk/wiki
    # then
    python retrieval/search.py data/wikipedia-3sentence-level-retrieval-index/files "Where is Zurich?"
    python inference/bot.py --retrieval data/wikipedia-3sentence-level-retrieval-index/files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openchatkit.cli import run_main

HERE = Path(__file__).resolve().parent
HUB_REPO = "ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index"
EMBEDDER = "facebook/contriever-msmarco"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--output",
        type=Path,
        default=HERE / "files",
        help="download folder (default: files/ next to this script)",
    )
    p.add_argument("--revision", default=None, help="dataset revision (default: main)")
    p.add_argument(
        "--skip-embedder", action="store_true", help=f"do not fetch the query embedder {EMBEDDER}"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from openchatkit.errors import UserError

    try:
        # snapshot_download keeps partial files as *.incomplete and resumes them; files already
        # complete are skipped after a size/hash check, so running again is cheap.
        folder = snapshot_download(
            HUB_REPO,
            repo_type="dataset",
            revision=args.revision,
            local_dir=args.output,
            allow_patterns=["knn.index", "*.parquet", "README.md"],
        )
        if not args.skip_embedder:
            snapshot_download(EMBEDDER, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise UserError(
            f"cannot download {HUB_REPO}: offline (no network or HF_HUB_OFFLINE=1); "
            "run again with network access"
        ) from err
    except (HfHubHTTPError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot download {HUB_REPO}: {reason}") from err
    print(f"Wikipedia index in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
