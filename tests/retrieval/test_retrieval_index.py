"""Index folders end to end through the library: build, load, paraphrase search, merging, checks."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from openchatkit.errors import UserError
from openchatkit.retrieval import Passage, RetrievalIndex, build_index, read_corpus
from openchatkit.retrieval.index import INDEX_FILE, META_FILE, PASSAGES_FILE


@pytest.fixture(scope="module")
def loaded(generated_index, embedder):
    return RetrievalIndex.load(generated_index[0], embedder=embedder, device="cpu")


def test_folder_layout_and_meta(generated_index, loaded):
    folder, _ = generated_index
    assert sorted(p.name for p in folder.iterdir()) == [INDEX_FILE, META_FILE, PASSAGES_FILE]
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["embedder"] == "all-MiniLM-L6-v2"
    assert meta["dimension"] == 384
    assert meta["metric"] == "inner_product" and meta["normalized"] is True
    assert meta["index_type"] == "flat"  # chosen by size
    assert meta["num_passages"] == len(loaded) == len(loaded.passages)
    assert loaded.device == "cpu"


@pytest.mark.parametrize("number", range(8))
def test_paraphrased_query_finds_its_passage_first(loaded, facts, number):
    assert len(facts) == 8
    title, _, query, key = facts[number]
    hits = loaded.search(query, k=3, merge_window=0)
    assert hits[0].title == title, [(h.title, round(h.score, 3)) for h in hits]
    assert key in hits[0].text
    assert hits[0].score > hits[1].score
    assert hits[0].source.endswith(f"facts.jsonl:{number + 1}")


def test_markdown_code_is_not_indexed(loaded):
    texts = [loaded.passages.text(i) for i in range(len(loaded.passages))]
    assert not any("not prose" in t for t in texts)
    assert any(t.startswith("Slugs eat lettuce") for t in texts)


def test_search_vectors_matches_exact_inner_product(loaded, embedder):
    q = embedder.encode_query("a night train with wooden bunks")
    scores, rows = loaded.search_vectors(q, 5)
    stored = loaded.cpu_index.reconstruct_n(0, len(loaded))
    exact = np.argsort(-(stored @ q[0]))[:5]
    assert rows[0].tolist() == exact.tolist()
    assert np.allclose(scores[0], (stored @ q[0])[exact], atol=1e-5)
    # k larger than the index is clamped, not an error.
    assert loaded.search_vectors(q, 10_000)[1].shape == (1, len(loaded))


@pytest.fixture(scope="module")
def merge_index(tmp_path_factory, embedder):
    """Doc A: three fox sentences then tax law; doc B right after: another fox sentence."""
    fox = [
        "The red fox hunts voles in the snowy meadow at dawn.",
        "In the snowy meadow the red fox listens for voles under the snow.",
        "At dawn the red fox pounces on voles hidden in the meadow snow.",
    ]
    passages = [Passage(t, "A", "a.txt", i) for i, t in enumerate(fox)]
    passages.append(Passage("Corporate tax returns are due in the fourth month.", "A", "a.txt", 3))
    passages.append(Passage("The red fox hunts voles in snowy meadows at dawn.", "B", "b.txt", 0))
    out = tmp_path_factory.mktemp("merge") / "index"
    build_index(passages, out, embedder, progress=False)
    return RetrievalIndex.load(out, embedder=embedder, device="cpu")


def test_neighbours_merge_within_source_and_spans_are_not_repeated(merge_index):
    hits = merge_index.search("red fox listening for voles under snow", k=3, merge_threshold=0.5)
    first = hits[0]
    assert first.source == "a.txt"
    assert (first.first_position, first.last_position) == (0, 2)  # tax sentence not merged
    assert "Corporate tax" not in first.text
    assert first.text.startswith("The red fox hunts") and first.text.endswith("meadow snow.")
    # The near-duplicate fox sentence of doc B is its own hit, never glued onto doc A's span,
    # and rows already inside doc A's span are not returned again.
    assert [h.source for h in hits] == ["a.txt", "b.txt", "a.txt"]
    assert hits[1].first_position == hits[1].last_position == 0
    assert hits[2].position == 3 and "Corporate tax" in hits[2].text


def test_merging_off_and_threshold(merge_index):
    hit = merge_index.search("red fox listening for voles under snow", k=1, merge_window=0)[0]
    assert hit.first_position == hit.last_position == hit.position
    hit = merge_index.search("red fox listening for voles under snow", k=1, merge_threshold=1.01)[0]
    assert hit.first_position == hit.last_position
    hit = merge_index.search("red fox listening for voles under snow", k=1, merge_window=1)[0]
    assert hit.last_position - hit.first_position <= 2


def test_build_refuses_empty_and_existing(tmp_path, embedder, generated_index):
    with pytest.raises(UserError, match="empty corpus"):
        build_index([], tmp_path / "x", embedder, progress=False)
    with pytest.raises(UserError, match="exists"):
        build_index(read_corpus([generated_index[1] / "notes.txt"]), generated_index[0], embedder)


def _copy_index(src, dst):
    dst.mkdir()
    for name in (INDEX_FILE, META_FILE, PASSAGES_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_load_refuses_missing_files_and_folders(tmp_path, generated_index, embedder):
    with pytest.raises(UserError, match="no such index folder"):
        RetrievalIndex.load(tmp_path / "nope", embedder=embedder)
    broken = _copy_index(generated_index[0], tmp_path / "broken")
    (broken / PASSAGES_FILE).unlink()
    with pytest.raises(UserError, match="missing passages.parquet"):
        RetrievalIndex.load(broken, embedder=embedder)


def test_load_refuses_corrupt_files(tmp_path, generated_index, embedder):
    folder = _copy_index(generated_index[0], tmp_path / "c1")
    (folder / META_FILE).write_text("{not json")
    with pytest.raises(UserError, match="meta.json: unreadable"):
        RetrievalIndex.load(folder, embedder=embedder)
    folder = _copy_index(generated_index[0], tmp_path / "c2")
    (folder / PASSAGES_FILE).write_bytes(b"PAR1 garbage")
    with pytest.raises(UserError, match="unreadable parquet"):
        RetrievalIndex.load(folder, embedder=embedder)
    folder = _copy_index(generated_index[0], tmp_path / "c3")
    meta = json.loads((folder / META_FILE).read_text())
    meta["num_passages"] += 1
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="rebuild the index"):
        RetrievalIndex.load(folder, embedder=embedder)


def test_load_refuses_embedder_dimension_mismatch(tmp_path, generated_index, embedder):
    """An index of 8-dim vectors cannot be queried with 384-dim MiniLM vectors."""
    folder = _copy_index(generated_index[0], tmp_path / "dim")
    n = json.loads((folder / META_FILE).read_text())["num_passages"]
    small = faiss.IndexFlatIP(8)
    small.add(np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32))
    faiss.write_index(small, str(folder / INDEX_FILE))
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "dimension": 8, "embedder": "tiny-8d"}))
    with pytest.raises(
        UserError, match=r"gives 384-dim vectors but the index holds 8-dim.*tiny-8d"
    ):
        RetrievalIndex.load(folder, embedder=embedder)
    # meta.json disagreeing with the index file itself is caught before any embedder loads.
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="holds 8-dim vectors but meta.json says 384"):
        RetrievalIndex.load(folder, embedder=embedder)
