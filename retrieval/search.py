"""Query a retrieval index folder from the command line.

Prints the k best passages, best first, each with its score, title and source (neighbouring
passages similar to a hit are merged into it, as the chat bot sees them); --json prints one JSON
object with a "hits" list instead.

    python retrieval/search.py indexes/sample "Who founded Brindlewick Cartography?"
    python retrieval/search.py indexes/sample "lighthouse keeper" -k 5 --json
    python retrieval/search.py data/wikipedia-3sentence-level-retrieval-index/files "Where is Zurich?"
"""

from __future__ import annotations

import argparse
import os
import sys

from openchatkit.cli import run_main

# Library debug lines (loguru's default level) are noise for a CLI user; LOGURU_LEVEL=DEBUG shows them.
os.environ.setdefault("LOGURU_LEVEL", "INFO")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "index_dir",
        metavar="INDEX_DIR",
        help="folder written by build_index.py (or the original's Wikipedia folder)",
    )
    p.add_argument("query", help="the question or keywords")
    p.add_argument("-k", type=int, default=5, help="passages to return (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--merge-window",
        type=int,
        default=5,
        metavar="W",
        help="neighbouring passages to consider merging on each side (default 5; 0 = off)",
    )
    p.add_argument(
        "--merge-threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="cosine similarity a neighbour needs to be merged (default 0.5)",
    )
    p.add_argument(
        "--embedder",
        default=None,
        metavar="NAME_OR_PATH",
        help="query embedder (default: the one recorded in meta.json)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where faiss searches (default auto: GPU when faiss-gpu sees one)",
    )
    args = p.parse_args(argv)
    from openchatkit.errors import UserError

    if not args.query.strip():
        raise UserError("the query is empty: give a question or keywords")
    if args.k < 1:
        raise UserError("-k must be >= 1")
    if args.merge_window < 0:
        raise UserError("--merge-window must be >= 0")
    from pathlib import Path

    if not Path(args.index_dir).is_dir():  # before the slow imports
        what = "a file, not a folder" if Path(args.index_dir).exists() else "not found"
        raise UserError(f"no such index folder {args.index_dir} ({what})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.disable_progress_bar()  # the per-tensor "Loading weights" bar
    import json
    import textwrap

    from openchatkit.retrieval import RetrievalIndex

    index = RetrievalIndex.load(args.index_dir, embedder=args.embedder, device=args.device)
    hits = index.search(
        args.query, k=args.k, merge_window=args.merge_window, merge_threshold=args.merge_threshold
    )
    if args.json:
        print(
            json.dumps(
                {"query": args.query, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False
            )
        )
        return 0
    from openchatkit.terminal import for_stream

    for rank, hit in enumerate(hits, start=1):
        span = (
            f"passage {hit.position}"
            if hit.first_position == hit.last_position
            else f"passages {hit.first_position}-{hit.last_position}"
        )
        # An index's text is shown as text on a terminal, never as escape sequences.
        head = for_stream(f"{hit.title}  [{hit.source}, {span}]", sys.stdout)
        print(f"{rank}. score {hit.score:.3f}  {head}")
        print(textwrap.indent(textwrap.fill(for_stream(hit.text, sys.stdout), width=96), "   "))
        print()
    if not hits:
        print("no passages found")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
