"""Rerankers: re-score the top candidates of a first-stage search.

`MaxSimReranker` (default, no extra weights): ColBERT-style late interaction on
the index's own encoder. Query and passage are encoded token by token; a
passage scores the mean, over query tokens, of each token's best cosine
similarity to any passage token. It keeps the word-level matching that a single
pooled vector averages away.

`CrossEncoderReranker`: any sentence-transformers cross-encoder the user has
(a local folder or a Hugging Face id), e.g. `cross-encoder/ms-marco-MiniLM-L-6-v2`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Reranker(Protocol):
    name: str

    def score(self, query: str, texts: list[str]) -> np.ndarray: ...


class MaxSimReranker:
    name = "maxsim"

    def __init__(self, encoder):
        self.encoder = encoder

    def _tokens(self, texts: list[str]):
        import torch

        out = self.encoder.model.encode(texts, output_value="token_embeddings", batch_size=self.encoder.batch_size,
                                        convert_to_numpy=False, show_progress_bar=False)
        return [torch.nn.functional.normalize(t.float(), dim=-1) for t in out]

    def score(self, query: str, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        q = self._tokens([query])[0]
        return np.array([float((q @ d.T).max(dim=1).values.mean()) for d in self._tokens(texts)], dtype=np.float32)


class CrossEncoderReranker:
    name = "cross-encoder"

    def __init__(self, model_name: str, device: str | None = None):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_name, device=device or "cpu")

    def score(self, query: str, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        return np.asarray(self.model.predict([(query, t) for t in texts], show_progress_bar=False), dtype=np.float32)
