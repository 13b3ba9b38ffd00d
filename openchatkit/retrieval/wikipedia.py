"""Reader for the original OpenChatKit's prebuilt Wikipedia index folder.

That folder (the Hub dataset `ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index`,
fetched by `data/wikipedia-3sentence-level-retrieval-index/prepare.py`) holds `knn.index`, a faiss
IVF index of Contriever-msmarco embeddings of 3-sentence Wikipedia snippets, and
`wikipedia-en-sentences.parquet` whose `text_snippet` column is row-aligned with it. Queries are
embedded as the original did: Contriever-msmarco token states mean-pooled over real tokens, not
normalised, compared by inner product. The rows are consecutive snippets, so neighbouring rows
are merged like neighbouring passages of our own folders.

Provenance: an index folder is trusted input (faiss's parser is not hardened against hostile
files). `prepare.py` downloads one commit of the dataset (the one `main` names on the first run,
kept by every later run) and checks the sha256 of `knn.index` and the parquet against the
hub's own record for that commit; `openchatkit-source.json` records the commit, sizes and
hashes, and `load` refuses files whose sizes no longer match it.
"""

from __future__ import annotations

import json
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
SOURCE_FILE = "openchatkit-source.json"
PINNED_FILES = (INDEX_FILE, PASSAGES_FILE)


def read_source(folder: Path) -> dict[str, Any] | None:
    """The record prepare.py left in `folder`, or None (a folder made another way)."""
    path = folder / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        raise UserError(f"{path}: unreadable; run prepare.py again") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise UserError(f"{path}: not a download record; run prepare.py again")
    return record


def record_source(
    folder: Path, repo: str, revision: str, expected: dict[str, str], extra: dict | None = None
) -> dict[str, Any]:
    """After a download of commit `revision`: hash the pinned files, check them against the
    hub's sha256 for that commit (`expected`, name -> sha256), and write SOURCE_FILE."""
    from openchatkit.checkpoints import file_sha256
    from openchatkit.fileio import write_json

    files = {}
    for name in PINNED_FILES:
        path = folder / name
        if not path.is_file():
            continue
        digest = file_sha256(path)
        want = expected.get(name)
        if want is None:
            raise UserError(f"{repo}@{revision}: the hub gives no sha256 for {name}; not trusted")
        if digest != want:
            raise UserError(
                f"{path}: sha256 {digest[:16]}... differs from the hub's {want[:16]}... for "
                f"{repo}@{revision[:12]}; delete it and run prepare.py again"
            )
        files[name] = {"size": path.stat().st_size, "sha256": digest}
    record = {"repo": repo, "revision": revision, "files": files, **(extra or {})}
    write_json(folder / SOURCE_FILE, record)
    return record


def check_source(folder: Path) -> None:
    """At load: the files prepare.py checked still have their recorded sizes (a full hash of
    tens of GB at every start would cost minutes; prepare.py hashed them)."""
    record = read_source(folder)
    if record is None:
        return
    for name, want in record["files"].items():
        if name not in PINNED_FILES or not isinstance(want, dict):
            raise UserError(f"{folder / SOURCE_FILE}: unexpected entry {name!r}")
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != want.get("size"):
            raise UserError(
                f"{path} has changed since prepare.py checked it ({size} bytes, "
                f"{want.get('size')} recorded); run prepare.py again"
            )


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
    check_source(folder)
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
