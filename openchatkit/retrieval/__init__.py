"""Retrieval: FAISS indexes built from any corpus, queried in memory, for the chat bot.

Public API: `RetrievalIndex.load(index_dir)`,
`RetrievalIndex.search(query, k) -> list[Hit]`, `format_context(hits, tokenizer, max_tokens)`,
`CONTEXT_INSTRUCTION`; building: `read_corpus`, `Embedder`, `build_index`.
Importing this package does not import torch or faiss; they load on first use.
"""

from openchatkit.retrieval.context import CONTEXT_INSTRUCTION, format_context
from openchatkit.retrieval.corpus import Passage, read_corpus
from openchatkit.retrieval.embedder import DEFAULT_EMBEDDER, Embedder
from openchatkit.retrieval.index import Hit, RetrievalIndex, build_index

__all__ = [
    "CONTEXT_INSTRUCTION",
    "DEFAULT_EMBEDDER",
    "Embedder",
    "Hit",
    "Passage",
    "RetrievalIndex",
    "build_index",
    "format_context",
    "read_corpus",
]
