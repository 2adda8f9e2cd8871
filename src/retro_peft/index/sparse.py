"""BM25 through bm25s: English stop words and Snowball stemming (PyStemmer)."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

# bm25s logs every index build at DEBUG through its own handler.
logging.getLogger("bm25s").setLevel(logging.WARNING)
# bm25s imports JAX when it is installed and runs a top-k at import; on a GPU machine JAX then takes 75% of the
# GPU's memory in every process that imports bm25s, and the model's own CUDA allocations fail (seen on an H100:
# 12 training processes, each out of memory). retro-peft never runs JAX (top-k stays on numpy below), so JAX
# allocates on demand unless the user has set this themselves.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english").stemWords


def tokenize(texts: list[str], return_ids: bool):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), return_ids=return_ids, show_progress=False)


class SparseIndex:
    def __init__(self, retriever, n_docs: int):
        self.retriever = retriever
        self.n_docs = n_docs

    @classmethod
    def build(cls, texts: list[str]) -> SparseIndex:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(tokenize(texts, return_ids=True), show_progress=False)
        return cls(retriever, len(texts))

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path, n_docs: int) -> SparseIndex:
        import bm25s

        return cls(bm25s.BM25.load(str(folder), show_progress=False, verbosity=0), n_docs)

    def search_tokens(self, query_tokens: list[list[str]], k: int, allowed: np.ndarray | None = None):
        """Top-k BM25 over pre-tokenised queries: (scores, rows), rows -1 where fewer matched."""
        n = len(query_tokens)
        k = min(k, self.n_docs)
        if k <= 0 or (allowed is not None and not len(allowed)):
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        mask = None
        if allowed is not None:
            mask = np.zeros(self.n_docs, dtype=np.float32)
            mask[allowed] = 1.0
        # A query with no token in the vocabulary matches nothing; bm25s cannot take it.
        tokens = [[t for t in q if t in self.retriever.vocab_dict] for q in query_tokens]
        live = [i for i, q in enumerate(tokens) if q]
        scores = np.zeros((n, k), dtype=np.float32)
        rows = np.full((n, k), -1, dtype=np.int64)
        if live:
            found, found_scores = self.retriever.retrieve([tokens[i] for i in live], k=k, show_progress=False,
                                                          weight_mask=mask, n_threads=0,
                                                          backend_selection="numpy")
            rows[live], scores[live] = found, found_scores
        rows[scores <= 0] = -1  # BM25 score 0 means no query term matched
        return scores, rows

    def search(self, queries: list[str], k: int, allowed: np.ndarray | None = None):
        return self.search_tokens(tokenize(queries, return_ids=False), k, allowed)
