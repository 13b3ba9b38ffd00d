"""Retrieval benchmark: our build and search paths against raw sentence-transformers and faiss.

Side by side in one run:
1. Embedding throughput (passages/s) of our build path (`Embedder.encode`, as used by
   `retrieval/build_index.py`) against a raw `SentenceTransformer.encode` call on the same
   passages (goal: ours/raw >= 1.0).
2. Query latency p50/p99 (one query at a time, the chat use case) and recall@10 against exact
   search, for flat, hnsw and ivfpq, at 20k vectors embedded from real text (docstrings of
   Python's standard library and site-packages, read with `ast`, never imported) and at 1M
   clustered synthetic vectors. "ours" is `RetrievalIndex.search_vectors`; "raw" is
   `index.search` on the same faiss index with the same parameters (goal: ours/raw <= 1.05,
   recall@10 >= 0.95 for the approximate types; ivfpq is also shown without its refine step).

Run (2 CPU cores take ~10 min the first time; real-text embeddings are cached in /tmp):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_retrieval.py
    .venv/bin/python benchmarks/bench_retrieval.py --num-synthetic 100000 --skip-throughput  # quick
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import sys
import sysconfig
import time
from pathlib import Path

CACHE_DIR = Path("/tmp/openchatkit-bench-retrieval")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--num-real", type=int, default=20_000, help="real-text passages (default 20000)"
    )
    p.add_argument("--num-queries", type=int, default=500, help="held-out queries (default 500)")
    p.add_argument("--num-synthetic", type=int, default=1_000_000, help="synthetic vectors")
    p.add_argument(
        "--synthetic-dim", type=int, default=384, help="synthetic dimension (MiniLM: 384)"
    )
    p.add_argument("--throughput-passages", type=int, default=1000, help="passages per side")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--types", nargs="+", default=["flat", "ivfpq", "hnsw"], help="index types (all three)"
    )
    p.add_argument("--num-synthetic-queries", type=int, default=200, help="synthetic queries")
    p.add_argument("--skip-real", action="store_true", help="no real-text part (no embedding)")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--prepare-only", action="store_true", help="only embed and cache the corpus")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    return p.parse_args(argv)


def real_text_passages(num: int) -> list[str]:
    """`num` distinct passages of 3 sentences from docstrings on this machine, deterministic."""
    from openchatkit.retrieval.corpus import document_passages

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    seen: set[str] = set()
    texts: list[str] = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if {"test", "tests", "idlelib"} & set(path.parts):
                continue
            try:
                tree = ast.parse(path.read_text("utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                    continue
                doc = ast.get_docstring(node)
                if not doc or len(doc.split()) < 20:
                    continue
                for passage in document_passages(doc, path.name, str(path), 3):
                    if len(passage.text.split()) >= 12 and passage.text not in seen:
                        seen.add(passage.text)
                        texts.append(passage.text)
            if len(texts) >= num:
                return texts[:num]
    return texts


def cached_real_embeddings(texts: list[str], cache_dir: Path):
    """Embeddings of `texts` with the default embedder, cached by content hash (~5 min fresh)."""
    import numpy as np

    from openchatkit.retrieval.embedder import Embedder

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"minilm-{len(texts)}-{digest}.npy"
    if path.exists():
        return np.load(path)
    print(f"embedding {len(texts)} passages once (cached in {path})", flush=True)
    vectors = Embedder().encode(texts, progress=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    return vectors


def clustered_vectors(num: int, dim: int, seed: int = 0, num_clusters: int = 1000):
    """Unit vectors around `num_clusters` random centres (float32, generated in chunks).

    Per-dimension noise 0.05 around unit centres gives cos(point, centre) ~ 0.7, the spread of
    sentence embeddings around a topic; uniform random vectors have no neighbours worth finding
    and make PQ look far worse than it is on text.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, 100_000):
        n = min(100_000, num - start)
        x = centres[rng.integers(0, num_clusters, n)]
        x = x + 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentile_ms(samples: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.array(samples) * 1000, q))


def recall_at_k(found, truth) -> float:
    import numpy as np

    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def bench_throughput(texts: list[str], batch_size: int = 64, repeats: int = 3) -> dict:
    """Passages/s of our build path's embedding vs raw SentenceTransformer.encode (best of N)."""

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from openchatkit.retrieval.embedder import DEFAULT_EMBEDDER, Embedder, resolve_embedder

    ours = Embedder()
    raw = SentenceTransformer(resolve_embedder(DEFAULT_EMBEDDER), local_files_only=True)
    ours.encode(texts[:64], batch_size=batch_size)  # warm-up: first-call allocations
    raw.encode(texts[:64], batch_size=batch_size)
    best = {"ours": float("inf"), "raw": float("inf")}
    vectors = {}
    for r in range(repeats):
        # Alternate who goes first: the machine is shared, load drifts during a run.
        sides = ["ours", "raw"] if r % 2 == 0 else ["raw", "ours"]
        for side in sides:
            start = time.perf_counter()
            if side == "ours":
                vectors[side] = ours.encode(texts, batch_size=batch_size)
            else:
                vectors[side] = raw.encode(texts, batch_size=batch_size, convert_to_numpy=True)
            best[side] = min(best[side], time.perf_counter() - start)
    max_diff = float(np.abs(vectors["ours"] - vectors["raw"]).max())
    result = {
        "passages": len(texts),
        "ours_per_s": len(texts) / best["ours"],
        "raw_per_s": len(texts) / best["raw"],
        "max_abs_diff": max_diff,
    }
    result["ratio"] = result["ours_per_s"] / result["raw_per_s"]
    return result


def bench_latency(label: str, vectors, queries, index_types, k: int = 10) -> list[dict]:
    """Per-query latency (ours vs raw faiss, same index and params) and recall@k vs exact."""

    import faiss
    import numpy as np

    from openchatkit.retrieval.faiss_index import apply_search_params, make_faiss_index
    from openchatkit.retrieval.index import RetrievalIndex

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    truth = exact.search(queries, k)[1]
    del exact
    rows = []
    for index_type in index_types:
        start = time.perf_counter()
        index, factory, params = make_faiss_index(vectors, index_type)
        build_s = time.perf_counter() - start
        ours = RetrievalIndex(index, passages=None, meta={}, embedder=None, device="cpu")
        for q in queries[:20]:  # warm caches and faiss's lazily built tables
            ours.search_vectors(q[None], k)
        lat = {"ours": [], "raw": []}
        found = []
        identical = True
        for i in range(len(queries)):
            q = queries[i : i + 1]
            for side in ("ours", "raw") if i % 2 == 0 else ("raw", "ours"):
                start = time.perf_counter()
                if side == "ours":
                    _, ids = ours.search_vectors(q, k)
                else:
                    _, raw_ids = index.search(q, k)
                lat[side].append(time.perf_counter() - start)
            identical &= bool(np.array_equal(ids, raw_ids))
            found.append(ids[0])
        row = {
            "set": label,
            "type": index_type,
            "factory": factory,
            "params": params,
            "build_s": build_s,
            "ours_p50_ms": percentile_ms(lat["ours"], 50),
            "ours_p99_ms": percentile_ms(lat["ours"], 99),
            "raw_p50_ms": percentile_ms(lat["raw"], 50),
            "raw_p99_ms": percentile_ms(lat["raw"], 99),
            "recall": recall_at_k(found, truth),
            "identical": identical,
        }
        row["ratio_p50"] = row["ours_p50_ms"] / row["raw_p50_ms"]
        if "k_factor" in params:  # the same index without its refine step: PQ codes alone
            apply_search_params(index, {**params, "k_factor": 1})
            row["recall_pq_only"] = recall_at_k(index.search(queries, k)[1], truth)
            # How much shortlist the refine step needs (batched searches: recall only).
            row["k_factor_sweep"] = {}
            for k_factor in (8, 16, 32, 64, 128):
                apply_search_params(index, {**params, "k_factor": k_factor})
                row["k_factor_sweep"][k_factor] = recall_at_k(index.search(queries, k)[1], truth)
            row["nprobe_sweep"] = {}
            for nprobe in (8, 16, 32, 64, 128):
                apply_search_params(index, {**params, "nprobe": nprobe})
                row["nprobe_sweep"][nprobe] = recall_at_k(index.search(queries, k)[1], truth)
            apply_search_params(index, params)
        if "efSearch" in params:  # the graph's recall at other query-time beam widths
            row["ef_sweep"] = {}
            for ef in (64, 128, 256, 512):
                apply_search_params(index, {"efSearch": ef})
                row["ef_sweep"][ef] = recall_at_k(index.search(queries, k)[1], truth)
            apply_search_params(index, params)
        print(format_latency_row(row), flush=True)
        rows.append(row)
        del index, ours
    return rows


def format_latency_row(row: dict) -> str:
    extra = ""
    if "recall_pq_only" in row:
        sweep = " ".join(f"{kf}:{r:.3f}" for kf, r in row["k_factor_sweep"].items())
        probes = " ".join(f"{n}:{r:.3f}" for n, r in row["nprobe_sweep"].items())
        extra = f", PQ alone {row['recall_pq_only']:.3f}, by k_factor {sweep}, by nprobe {probes}"
    if "ef_sweep" in row:
        extra = ", by efSearch " + " ".join(f"{ef}:{r:.3f}" for ef, r in row["ef_sweep"].items())
    return (
        f"{row['set']:>14} {row['type']:>5}  p50 ours {row['ours_p50_ms']:7.3f} ms raw "
        f"{row['raw_p50_ms']:7.3f} ms ({row['ratio_p50']:.3f}x)  p99 ours {row['ours_p99_ms']:7.3f} "
        f"raw {row['raw_p99_ms']:7.3f}  recall@10 {row['recall']:.3f}{extra}  "
        f"build {row['build_s']:.1f}s  {row['factory']} {row['params']} same-ids={row['identical']}"
    )


def bench_end_to_end(texts: list[str], vectors, queries_text: list[str]) -> dict:
    """Latency of the full `RetrievalIndex.search(text)`: query embedding + search + merging."""

    import pyarrow as pa

    from openchatkit.retrieval.embedder import Embedder
    from openchatkit.retrieval.faiss_index import make_faiss_index
    from openchatkit.retrieval.index import PassageTable, RetrievalIndex

    index, _, _ = make_faiss_index(vectors, "flat")
    table = pa.table(
        {
            "text": texts,
            "title": [""] * len(texts),
            "source": [str(i // 4) for i in range(len(texts))],  # runs of 4 as documents
            "position": [i % 4 for i in range(len(texts))],
        }
    )
    ret = RetrievalIndex(index, PassageTable(table), {}, Embedder(), device="cpu")
    ret.search(queries_text[0], k=3)
    lat = {"embed": [], "search": []}
    for q in queries_text:
        start = time.perf_counter()
        ret.embed_query(q)
        lat["embed"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ret.search(q, k=3)
        lat["search"].append(time.perf_counter() - start)
    return {
        "queries": len(queries_text),
        "embed_p50_ms": percentile_ms(lat["embed"], 50),
        "search_p50_ms": percentile_ms(lat["search"], 50),
        "search_p99_ms": percentile_ms(lat["search"], 99),
    }


def machine() -> str:
    import os
    import subprocess

    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(
        (ln.split(":", 1)[1].strip() for ln in model.splitlines() if "Model name" in ln), "?"
    )
    return f"{name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import faiss

    print(f"machine: {machine()}; faiss {faiss.__version__} threads {faiss.omp_get_max_threads()}")
    if not args.skip_real or args.prepare_only:
        texts = real_text_passages(args.num_real + args.num_queries)
        vectors = cached_real_embeddings(texts, args.cache_dir)
        if args.prepare_only:
            return 0
    if not args.skip_throughput:
        sample = texts[:: max(1, len(texts) // args.throughput_passages)][
            : args.throughput_passages
        ]
        t = bench_throughput(sample)
        print(
            f"embedding {t['passages']} passages: ours {t['ours_per_s']:.1f}/s raw "
            f"sentence-transformers {t['raw_per_s']:.1f}/s ratio {t['ratio']:.3f}x "
            f"(max |diff| {t['max_abs_diff']:.1e})",
            flush=True,
        )
    if not args.skip_real:
        base, queries = vectors[: args.num_real], vectors[args.num_real :]
        bench_latency(f"real {len(base) // 1000}k", base, queries, args.types)
        # Chat-like queries: the first sentence (<= 20 words) of held-out passages.
        from openchatkit.retrieval.corpus import split_sentences

        questions = [
            " ".join(split_sentences(t)[0].split()[:20]) for t in texts[args.num_real :][:100]
        ]
        e2e = bench_end_to_end(texts[: args.num_real], base, questions)
        print(
            f"end to end RetrievalIndex.search(text, k=3) over {len(base)} passages: p50 "
            f"{e2e['search_p50_ms']:.1f} ms (query embedding p50 {e2e['embed_p50_ms']:.1f} ms), "
            f"p99 {e2e['search_p99_ms']:.1f} ms",
            flush=True,
        )
    if not args.skip_synthetic:
        n = args.num_synthetic
        data = clustered_vectors(n + args.num_synthetic_queries, args.synthetic_dim)
        base, queries = data[:n], data[n:]
        label = f"synthetic {n // 1000}k" if n < 1_000_000 else f"synthetic {n / 1e6:g}M"
        # hnsw last (default order): its graph build is the slowest step at 1M on a small CPU.
        bench_latency(label, base, queries, args.types)
    return 0


if __name__ == "__main__":
    sys.exit(main())
