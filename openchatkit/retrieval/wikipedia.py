"""Reader for the original OpenChatKit's prebuilt Wikipedia index folder.

That folder (the Hub dataset `ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index`,
fetched by `data/wikipedia-3sentence-level-retrieval-index/prepare.py`) holds `knn.index`, a faiss
IVF index of Contriever-msmarco embeddings of 3-sentence Wikipedia snippets, and
`wikipedia-en-sentences.parquet` whose `text_snippet` column is row-aligned with it. Queries are
embedded as the original did: Contriever-msmarco token states mean-pooled over real tokens, not
normalised, compared by inner product. The rows are consecutive snippets, so neighbouring rows
are merged like neighbouring passages of our own folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openchatkit.errors import UserError
from openchatkit.retrieval.embedder import Embedder, check_dimension
from openchatkit.retrieval.faiss_index import place_index, read_faiss_index
from openchatkit.retrieval.passages import PassageTable, read_passages

HUB_REPO = "ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index"
INDEX_FILE = "knn.index"
PASSAGES_FILE = "wikipedia-en-sentences.parquet"
TEXT_COLUMN = "text_snippet"
EMBEDDER = "facebook/contriever-msmarco"


def is_wikipedia_layout(folder: Path) -> bool:
    """A folder with `knn.index` and no meta.json of ours."""
    return (folder / INDEX_FILE).is_file() and not (folder / "meta.json").exists()


def passages_file(folder: Path) -> Path:
    """The snippets parquet: the original's name, else the only parquet in the folder."""
    path = folder / PASSAGES_FILE
    if path.is_file():
        return path
    candidates = sorted(folder.glob("*.parquet"))
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(f"{folder}: has {INDEX_FILE} but no {PASSAGES_FILE}; download it again")


def load(
    folder: Path,
    embedder: Embedder | str | None = None,
    device: str = "auto",
    mmap: bool | None = None,
) -> tuple[Any, PassageTable, dict[str, Any], Embedder, str, Any]:
    """What a RetrievalIndex over the Wikipedia folder is made of (memory-mapped, like the
    original): (index, passages, meta, embedder, device placed on, cpu index)."""
    cpu_index = read_faiss_index(folder / INDEX_FILE, mmap=True if mmap is None else mmap)
    passages = read_passages(passages_file(folder), columns={TEXT_COLUMN: "text"})
    if cpu_index.ntotal != len(passages):
        raise UserError(
            f"{folder}: {INDEX_FILE} has {cpu_index.ntotal} vectors but the parquet has "
            f"{len(passages)} rows; download it again"
        )
    if embedder is None or isinstance(embedder, str):
        embedder = Embedder(embedder or EMBEDDER, pooling="mean", normalize=False)
    check_dimension(embedder, cpu_index.d, folder, EMBEDDER)
    meta: dict[str, Any] = {
        "format": "openchatkit-wikipedia-3sentence",
        "embedder": embedder.name,
        "pooling": "mean",
        "dimension": int(cpu_index.d),
        "metric": "inner_product",
        "normalized": False,
        "num_passages": int(cpu_index.ntotal),
        "index_type": "prebuilt",
    }
    index, placed = place_index(cpu_index, device)
    return index, passages, meta, embedder, placed, cpu_index
