"""Download the original OpenChatKit's prebuilt Wikipedia retrieval index (and its query embedder).

Fetches the Hub dataset ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index
(`knn.index`: faiss index of Contriever-msmarco embeddings of 3-sentence Wikipedia snippets, and
`wikipedia-en-sentences.parquet`) into `files/` next to this script, with a progress bar per
file; an interrupted download resumes where it stopped when run again. The query embedder
facebook/contriever-msmarco goes to the Hugging Face cache so searching works offline later.
Tens of GB: check the free disk space first.

Pinned: the first run resolves `main` (or --revision) to a commit and downloads that commit;
`knn.index` and the parquet are checked against the hub's sha256 for it and recorded, with the
commit, in `files/openchatkit-source.json`; later runs keep that commit unless --revision says
otherwise. The index folder is trusted input: see "Trust and safety" in the README.

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
    p.add_argument(
        "--revision",
        default=None,
        help="dataset revision (default: the commit recorded by an earlier run, else main's)",
    )
    p.add_argument(
        "--skip-embedder", action="store_true", help=f"do not fetch the query embedder {EMBEDDER}"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from openchatkit.errors import UserError
    from openchatkit.retrieval.wikipedia import PINNED_FILES, read_source, record_source

    recorded = read_source(args.output) if args.output.is_dir() else None
    try:
        api = HfApi()
        # One commit, resolved once: a later run never moves to a newer upstream silently.
        revision = args.revision or (recorded or {}).get("revision")
        commit = api.dataset_info(HUB_REPO, revision=revision).sha
        paths = api.get_paths_info(
            HUB_REPO, list(PINNED_FILES), revision=commit, repo_type="dataset"
        )
        expected = {p.path: p.lfs.sha256 for p in paths if getattr(p, "lfs", None) is not None}
        # snapshot_download keeps partial files as *.incomplete and resumes them; files already
        # complete are skipped after a size/hash check, so running again is cheap.
        folder = snapshot_download(
            HUB_REPO,
            repo_type="dataset",
            revision=commit,
            local_dir=args.output,
            allow_patterns=["knn.index", "*.parquet", "README.md"],
        )
        extra = {}
        if not args.skip_embedder:
            embedder_commit = api.model_info(EMBEDDER).sha
            snapshot_download(
                EMBEDDER,
                revision=embedder_commit,
                allow_patterns=["*.json", "*.txt", "*.safetensors"],
            )
            extra = {"embedder": EMBEDDER, "embedder_revision": embedder_commit}
        record_source(Path(folder), HUB_REPO, commit, expected, extra)
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
