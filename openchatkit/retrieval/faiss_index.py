"""Building, tuning, reading and placing faiss indexes (flat, hnsw, ivfpq).

All indexes use inner product: with L2-normalised embeddings (MiniLM) that is cosine
similarity; with un-normalised ones (Contriever) it is the dot product the model was trained for.

Automatic choice by size: exact `flat` search is fast enough below 100k vectors (a 384-dim scan of
100k vectors is ~40 MFLOP, a few ms); `hnsw` (a graph over the full vectors) up to 1M; `ivfpq`
(inverted lists of 8-bit product-quantised codes, ~48 bytes per 384-dim vector) from 1M, with a
refine step that re-scores the PQ shortlist with 8-bit scalar-quantised vectors, because PQ codes
alone rank too coarsely to reach recall@10 >= 0.95.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from openchatkit.errors import UserError

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
FLAT_MAX = 100_000
HNSW_MAX = 1_000_000
IVFPQ_MIN = 1_000  # fewer points cannot train 256 PQ centroids per sub-space sensibly
HNSW_M = 32  # graph neighbours per node: faiss's usual recall/memory trade-off
HNSW_EF_CONSTRUCTION = (
    80  # faiss default 40 gave recall@10 0.88 instead of >0.95 on clustered test data
)
HNSW_EF_SEARCH = 128  # candidate list at query time; ~0.99 recall@10 on MiniLM text at 20k
IVF_MIN_NPROBE = 32
IVF_K_FACTOR = 64  # refine re-scores k * 64 PQ candidates: 640 SQ8 vectors for k=10, ~0.1 ms
# Memory-map indexes whose file is larger than this (bytes) even when not IVF, and always IVF.
MMAP_MIN_BYTES = 1 << 30


def choose_index_type(num_vectors: int) -> str:
    """The index type for `num_vectors` when the user does not choose (see module docstring)."""
    if num_vectors < FLAT_MAX:
        return "flat"
    if num_vectors < HNSW_MAX:
        return "hnsw"
    return "ivfpq"


def ivfpq_layout(num_vectors: int, dim: int) -> tuple[int, int]:
    """(number of IVF lists, number of PQ sub-quantisers) for `num_vectors` of `dim`.

    Lists: ~sqrt(n) rounded to a power of two (1M -> 1024), at least 39 training points each
    (faiss's k-means warns below that); fewer, larger lists keep k-means training affordable on a
    CPU and nprobe = nlist/16 keeps recall high on clustered (text) data. Sub-quantisers: the largest divisor of `dim` up to dim/8, so each
    8-bit code covers >= 8 dimensions (384 -> 48 bytes per vector).
    """
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num_vectors))))
    nlist = int(max(1, min(nlist, num_vectors // 39, 65536)))
    m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    return nlist, m


def default_search_params(index_type: str, nlist: int | None = None) -> dict[str, Any]:
    """Query-time parameters stored in meta.json and applied on load."""
    if index_type == "hnsw":
        return {"efSearch": HNSW_EF_SEARCH}
    if index_type == "ivfpq":
        # nlist/16 lists probed (at least 32): on clustered data the true neighbours sit in few
        # lists; MiniLM text at 20k (128 lists) needed 32 probes for recall@10 >= 0.95.
        return {
            "nprobe": max(1, min(nlist or 1, max(IVF_MIN_NPROBE, (nlist or 1) // 16))),
            "k_factor": IVF_K_FACTOR,
        }
    return {}


def make_faiss_index(
    vectors: np.ndarray, index_type: str, seed: int = 0
) -> tuple[Any, str, dict[str, Any]]:
    """Build and fill a CPU faiss index over `vectors` (n, d) float32.

    Returns (index, faiss factory string, search params); the params are already applied.
    """
    import faiss

    if index_type not in INDEX_TYPES:
        raise UserError(f"--index-type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    num, dim = vectors.shape
    nlist = None
    if index_type == "flat":
        factory = "Flat"
    elif index_type == "hnsw":
        factory = f"HNSW{HNSW_M},Flat"
    else:
        if num < IVFPQ_MIN:
            raise UserError(
                f"--index-type ivfpq needs at least {IVFPQ_MIN} passages, the corpus has {num}; "
                "use flat (exact, and fast at this size)"
            )
        nlist, m = ivfpq_layout(num, dim)
        # "np": no polysemous training (it only serves Hamming pre-filtering, which we do not use,
        # and takes minutes even on small sets).
        factory = f"IVF{nlist},PQ{m}x8np,Refine(SQ8)"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index_type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not index.is_trained:
        # 64 points per IVF list (faiss asks for >= 39) and >= 65536 for the 256 PQ centroids
        # per sub-space: k-means cost grows with the sample, recall barely does beyond that.
        rng = np.random.default_rng(seed)
        sample_size = min(num, max(64 * (nlist or 1), 65_536))
        sample = vectors[np.sort(rng.choice(num, sample_size, replace=False))]
        logger.info("training {} on {} of {} vectors", factory, sample_size, num)
        index.train(sample)
    index.add(vectors)
    params = default_search_params(index_type, nlist)
    apply_search_params(index, params)
    return index, factory, params


def apply_search_params(index: Any, params: dict[str, Any]) -> None:
    """Set efSearch / nprobe / k_factor wherever they belong in a (possibly nested) index."""
    import faiss

    node = faiss.downcast_index(index)
    while node is not None:
        if isinstance(node, faiss.IndexRefine) and "k_factor" in params:
            node.k_factor = float(params["k_factor"])
        if hasattr(node, "nprobe") and "nprobe" in params:
            node.nprobe = int(params["nprobe"])
        if hasattr(node, "hnsw") and "efSearch" in params:
            node.hnsw.efSearch = int(params["efSearch"])
        inner = getattr(node, "base_index", None) or getattr(node, "index", None)
        node = faiss.downcast_index(inner) if inner is not None else None


def read_faiss_index(path: Path, mmap: bool | None = None) -> Any:
    """Read an index file; memory-mapped read-only when `mmap` (None: when large or IVF).

    A memory-mapped IVF index keeps its inverted lists on disk, so a Wikipedia-sized index
    opens in seconds and its pages are shared by every process that opens it.
    """
    import faiss

    if mmap is None:
        mmap = path.stat().st_size >= MMAP_MIN_BYTES or _looks_ivf(path)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as err:
        if mmap:
            # Some index types refuse memory-mapping; they still read into memory.
            try:
                index = faiss.read_index(str(path))
                mmap = False
            except RuntimeError:
                raise UserError(
                    f"{path}: not a readable faiss index ({_faiss_reason(err)})"
                ) from err
        else:
            raise UserError(f"{path}: not a readable faiss index ({_faiss_reason(err)})") from err
    logger.debug("read {} ({}, mmap={})", path, type(faiss.downcast_index(index)).__name__, mmap)
    return index


def _looks_ivf(path: Path) -> bool:
    # faiss files start with a 4-byte type tag: "IwPQ", "IwFl", "IvPQ"… for IVF, "IxRF"/"IRFl"
    # for refine wrappers around one.
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] in (b"Iw", b"Iv") or head in (b"IxRF", b"IRFl")


def _faiss_reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    last = text[-1] if text else type(err).__name__
    return last.split(": ", 1)[-1][:200]


def gpu_available() -> bool:
    """faiss was built with GPU support (faiss-gpu) and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def place_index(index: Any, device: str) -> tuple[Any, str]:
    """Move `index` to a GPU when asked ("gpu") or when possible ("auto"); else keep the CPU.

    HNSW has no GPU implementation, so it stays on the CPU; on "auto" any refusal falls back to
    the CPU with a log line. Returns (index, "gpu" | "cpu").
    """
    if device not in ("auto", "cpu", "gpu"):
        raise UserError(f"--device must be auto, cpu or gpu, got {device!r}")
    if device == "cpu":
        return index, "cpu"
    if not gpu_available():
        if device == "gpu":
            raise UserError("--device gpu: faiss has no GPU support here (install faiss-gpu)")
        return index, "cpu"
    import faiss

    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # keep alive as long as the index
        return gpu_index, "gpu"
    except RuntimeError as err:
        if device == "gpu":
            raise UserError(
                f"--device gpu: cannot move this index to the GPU ({_faiss_reason(err)})"
            ) from err
        logger.info("faiss index stays on the CPU: {}", _faiss_reason(err))
        return index, "cpu"
