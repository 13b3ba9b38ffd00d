"""A retrieval index folder on disk and its in-memory search, with neighbour merging.

Folder layout (written by `build_index`, read by `RetrievalIndex.load`):
- `index.faiss`: the faiss index, one vector per passage, row i = passage i;
- `passages.parquet`: columns `text`, `title`, `source`, `position` (passage number within its
  source document, so rows i-1 and i+1 are its neighbours when they share the source);
- `meta.json`: format, embedder name, dimension, metric, normalisation, passage count, index type,
  faiss factory string and the query-time search parameters.

The original OpenChatKit's prebuilt Wikipedia folder (`knn.index` + `wikipedia-en-sentences.parquet`,
Contriever-msmarco) loads through the same class (see `openchatkit.retrieval.wikipedia`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from openchatkit.errors import UserError
from openchatkit.fileio import atomic_dir, write_json
from openchatkit.retrieval import wikipedia
from openchatkit.retrieval.corpus import Passage
from openchatkit.retrieval.embedder import Embedder, check_dimension
from openchatkit.retrieval.faiss_index import (
    IVFPQ_MIN,
    apply_search_params,
    choose_index_type,
    make_faiss_index,
    place_index,
    read_faiss_index,
)
from openchatkit.retrieval.passages import PassageTable, read_passages, write_passages

INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.parquet"
META_FILE = "meta.json"
FORMAT = "openchatkit-retrieval-index"
FORMAT_VERSION = 1
# Neighbour merging as in the original OpenChatKit: look up to MERGE_WINDOW passages each side
# and keep extending while a neighbour's cosine similarity to the hit exceeds MERGE_THRESHOLD.
MERGE_WINDOW = 5
MERGE_THRESHOLD = 0.5


@dataclass
class Hit:
    """One retrieved passage (merged with its similar neighbours), best first in a result list.

    `position` is the matched passage's position in its source; `first_position` and
    `last_position` span what was merged around it; `row` is its row in passages.parquet.
    """

    text: str
    title: str
    source: str
    position: int
    score: float
    row: int
    first_position: int
    last_position: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_index(
    passages: Sequence[Passage],
    output_dir: str | Path,
    embedder: Embedder,
    index_type: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    overwrite: bool = False,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed `passages`, build the faiss index and write the index folder atomically.

    Returns the meta.json contents. A half-built folder never appears under `output_dir`.
    """
    import faiss

    output_dir = Path(output_dir)
    if not passages:
        raise UserError("no passages to index (empty corpus)")
    if output_dir.exists() and not overwrite:
        raise UserError(f"--output {output_dir}: exists; pass --overwrite to replace it")
    index_type = index_type or choose_index_type(len(passages))
    if index_type == "ivfpq" and len(passages) < IVFPQ_MIN:  # fail before the slow embedding
        raise UserError(
            f"--index-type ivfpq needs at least {IVFPQ_MIN} passages, the corpus has "
            f"{len(passages)}; use flat (exact, and fast at this size)"
        )
    start = time.perf_counter()
    vectors = embedder.encode([p.text for p in passages], batch_size=batch_size, progress=progress)
    embed_s = time.perf_counter() - start
    index, factory, params = make_faiss_index(vectors, index_type)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "embedder": embedder.name,
        "pooling": embedder.pooling,
        "dimension": embedder.dimension,
        "metric": "inner_product",
        "normalized": bool(embedder.normalize),
        "num_passages": len(passages),
        "index_type": index_type,
        "faiss_factory": factory,
        "search_params": params,
        **(extra_meta or {}),
    }
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_passages(tmp / PASSAGES_FILE, passages)
        write_json(tmp / META_FILE, meta)
    logger.info(
        "wrote {} ({} passages, {}, embedding {:.1f}s = {:.0f} passages/s)",
        output_dir,
        len(passages),
        factory,
        embed_s,
        len(passages) / max(embed_s, 1e-9),
    )
    return meta


def read_meta(index_dir: Path) -> dict[str, Any]:
    path = index_dir / META_FILE
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an OpenChatKit retrieval index (format != {FORMAT!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: index format version {meta.get('version')} is not supported")
    for key in ("embedder", "dimension", "num_passages", "index_type"):
        if key not in meta:
            raise UserError(f"{path}: missing {key!r}")
    return meta


class RetrievalIndex:
    """An index folder loaded for querying: faiss index + passages + the query embedder."""

    def __init__(
        self,
        index: Any,
        passages: PassageTable,
        meta: dict[str, Any],
        embedder: Embedder | None,
        device: str = "cpu",
        cpu_index: Any = None,
    ) -> None:
        self.index = index
        self.cpu_index = cpu_index if cpu_index is not None else index
        self.passages = passages
        self.meta = meta
        self.embedder = embedder
        self.device = device
        self._can_reconstruct: bool | None = None
        # Cached: reading ntotal through SWIG on every query is measurable at ~0.2 ms searches.
        self._num_vectors = int(self.cpu_index.ntotal)

    @classmethod
    def load(
        cls,
        index_dir: str | Path,
        embedder: Embedder | str | None = None,
        device: str = "auto",
        mmap: bool | None = None,
    ) -> RetrievalIndex:
        """Open an index folder (ours, or the original's Wikipedia layout) for querying.

        embedder: an Embedder, a name/path to load, or None for the one named in meta.json.
        device: "auto" (faiss GPU when available), "cpu" or "gpu". mmap: memory-map the index
        read-only (None: for IVF or large files). Raises UserError naming what is wrong:
        missing folder or file, unreadable file, count mismatch, embedder dimension mismatch.
        """
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            raise UserError(f"{index_dir}: no such index folder")
        if wikipedia.is_wikipedia_layout(index_dir):
            return cls(*wikipedia.load(index_dir, embedder=embedder, device=device, mmap=mmap))
        missing = [
            n for n in (META_FILE, INDEX_FILE, PASSAGES_FILE) if not (index_dir / n).is_file()
        ]
        if missing:
            raise UserError(
                f"{index_dir}: missing {', '.join(missing)} (not an index folder; "
                "build one with retrieval/build_index.py)"
            )
        meta = read_meta(index_dir)
        cpu_index = read_faiss_index(index_dir / INDEX_FILE, mmap=mmap)
        passages = read_passages(index_dir / PASSAGES_FILE)
        if cpu_index.d != meta["dimension"]:
            raise UserError(
                f"{index_dir / INDEX_FILE}: holds {cpu_index.d}-dim vectors but meta.json says "
                f"{meta['dimension']}"
            )
        if not (cpu_index.ntotal == len(passages) == meta["num_passages"]):
            raise UserError(
                f"{index_dir}: index has {cpu_index.ntotal} vectors, passages.parquet "
                f"{len(passages)} rows, meta.json {meta['num_passages']}: rebuild the index"
            )
        apply_search_params(cpu_index, meta.get("search_params") or {})
        if embedder is None or isinstance(embedder, str):
            embedder = Embedder(embedder or meta["embedder"], pooling=meta.get("pooling", "model"))
        check_dimension(embedder, cpu_index.d, index_dir, meta["embedder"])
        index, placed = place_index(cpu_index, device)
        return cls(index, passages, meta, embedder, device=placed, cpu_index=cpu_index)

    def __len__(self) -> int:
        return self._num_vectors

    def embed_query(self, query: str) -> np.ndarray:
        """(1, dimension) float32 query vector."""
        if self.embedder is None:
            raise RuntimeError("this index was loaded without an embedder; use search_vectors")
        return self.embedder.encode_query(query)

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw nearest neighbours: (scores (q, k) float32, rows (q, k) int64; -1 = none)."""
        if k > self._num_vectors:
            k = self._num_vectors
        return self.index.search(vectors, max(1, k))

    def search(
        self,
        query: str,
        k: int = 3,
        merge_window: int = MERGE_WINDOW,
        merge_threshold: float = MERGE_THRESHOLD,
    ) -> list[Hit]:
        """The `k` best passages for `query`, best first, each merged with similar neighbours.

        As in the original OpenChatKit, up to `merge_window` passages before and after a hit are
        appended while their cosine similarity to the hit exceeds `merge_threshold`
        (merge_window=0 turns merging off). Unlike the original, merging stops at the edge of
        the hit's source document, and a hit already inside an earlier hit's merged span is
        skipped, so the same text is never returned twice.
        """
        if k < 1 or len(self) == 0 or not query.strip():  # an empty query matches nothing
            return []
        # Ask for extra candidates: some may be swallowed by an earlier hit's merged span.
        scores, rows = self.search_vectors(self.embed_query(query), k * 2 if merge_window else k)
        hits: list[Hit] = []
        covered: set[int] = set()
        for score, row in zip(scores[0].tolist(), rows[0].tolist(), strict=True):
            if row < 0 or row in covered:
                continue
            first, last = self._merge_span(row, merge_window, merge_threshold)
            covered.update(range(first, last + 1))
            text = " ".join(self.passages.text(r) for r in range(first, last + 1))
            hits.append(
                Hit(
                    text=text,
                    title=self.passages.title(row),
                    source=self.passages.source(row),
                    position=self.passages.position(row),
                    score=float(score),
                    row=row,
                    first_position=self.passages.position(first),
                    last_position=self.passages.position(last),
                )
            )
            if len(hits) == k:
                break
        return hits

    def _merge_span(self, row: int, window: int, threshold: float) -> tuple[int, int]:
        """(first row, last row) of the merged span around `row`."""
        if window <= 0:
            return row, row
        source, position = self.passages.source(row), self.passages.position(row)
        # Neighbour candidates: same source, consecutive positions, within the window.
        lo = row
        while (
            lo > 0
            and row - lo < window
            and self._continues(lo - 1, source, position - (row - lo + 1))
        ):
            lo -= 1
        hi = row
        n = len(self.passages)
        while (
            hi < n - 1
            and hi - row < window
            and self._continues(hi + 1, source, position + (hi - row + 1))
        ):
            hi += 1
        if lo == hi:
            return row, row
        rows = np.arange(lo, hi + 1)
        vectors = self._vectors(rows)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        sims = vectors @ vectors[row - lo]
        first = row
        while first > lo and sims[first - 1 - lo] > threshold:
            first -= 1
        last = row
        while last < hi and sims[last + 1 - lo] > threshold:
            last += 1
        return first, last

    def _continues(self, row: int, source: str, position: int) -> bool:
        return self.passages.source(row) == source and self.passages.position(row) == position

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of `rows` when the index can give them back, else re-embedded."""
        if self._can_reconstruct is not False:
            try:
                out = self.cpu_index.reconstruct_batch(rows.astype(np.int64))
                self._can_reconstruct = True
                return np.array(out, dtype=np.float32)
            except RuntimeError:
                # IVF indexes without a direct map (the original's Wikipedia index) cannot.
                self._can_reconstruct = False
        return self.embedder.encode([self.passages.text(int(r)) for r in rows], batch_size=16)
