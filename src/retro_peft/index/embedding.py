"""Dense encoders (sentence-transformers) and the on-disk embedding cache.

The cache is one SQLite file per encoder, keyed by the chunk's content hash:
a rebuild, or an index over overlapping documents, embeds only what is new.
SQLite gives us atomic, crash-safe writes for free.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from retro_peft import paths, progress
from retro_peft.errors import ModelNotFoundError
from retro_peft.models import DEFAULT_ENCODER, resolve_encoder


class Encoder:
    """A sentence-transformers model producing L2-normalised float32 vectors."""

    def __init__(self, name: str = DEFAULT_ENCODER, device: str | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.batch_size = batch_size
        location = resolve_encoder(name)
        try:
            # device None: sentence-transformers' choice (CUDA when there is one); vectors from either agree
            # to float tolerance, so the embedding cache (keyed by the weights' fingerprint) serves both.
            self.model = SentenceTransformer(location, device=device)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"cannot load encoder {name!r} ({location}): {e}") from None
        self.tokenizer = self.model.tokenizer
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.max_tokens = int(self.model.max_seq_length) - 2  # room for [CLS] and [SEP]
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        # Identity of the weights, not of the name: the same model under a path
        # or a short name matches, a different one never does.
        transformer = self.model[0].auto_model
        h = hashlib.sha256(transformer.config.to_json_string().encode())
        first = next(transformer.parameters()).detach().cpu().contiguous()
        h.update(first.numpy().tobytes())
        h.update(str(self.dim).encode())
        return h.hexdigest()[:32]

    def encode(self, texts: list[str], show_progress: bool = False, desc: str = "embed") -> np.ndarray:
        """show_progress: a bar over the texts (chunks/s, ETA) when stderr is a terminal (`retro_peft.progress`)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not progress.enabled(show_progress):
            return self._encode(texts)
        # The batches sentence-transformers would form (longest first), one call each, so the bar counts texts.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with progress.bar(progress=True, desc=desc, total=len(texts), unit="chunk") as bar:
            for first in range(0, len(texts), self.batch_size):
                rows = order[first:first + self.batch_size]
                out[rows] = self._encode([texts[i] for i in rows])
                bar.update(len(rows))
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "fingerprint": self.fingerprint}


class EmbeddingCache:
    """Vectors by content hash, for one encoder."""

    def __init__(self, encoder: Encoder, folder: Path | None = None):
        folder = Path(folder or paths.cache_dir("embeddings"))
        folder.mkdir(parents=True, exist_ok=True)
        self.dim = encoder.dim
        self.db = sqlite3.connect(folder / f"{encoder.fingerprint}.sqlite", timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS vectors (hash TEXT PRIMARY KEY, vector BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("INSERT OR IGNORE INTO info VALUES ('encoder', ?)", (json.dumps(encoder.describe()),))
        self.db.commit()

    def get_many(self, hashes: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for i in range(0, len(hashes), 900):  # SQLite's bound-parameter limit
            batch = hashes[i : i + 900]
            rows = self.db.execute(
                f"SELECT hash, vector FROM vectors WHERE hash IN ({','.join('?' * len(batch))})", batch
            )
            for h, blob in rows:
                found[h] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                ((h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in items.items()),
            )

    def close(self) -> None:
        self.db.close()


def embed_with_cache(encoder: Encoder, texts: list[str], hashes: list[str], cache: EmbeddingCache | None,
                     show_progress: bool = False, desc: str = "embed") -> tuple[np.ndarray, int]:
    """Vectors for `texts`, embedding only cache misses (the bar counts those). Returns (vectors, number embedded)."""
    cached = cache.get_many(list(dict.fromkeys(hashes))) if cache else {}
    missing = list(dict.fromkeys(h for h in hashes if h not in cached))
    if missing:
        text_of = dict(zip(hashes, texts))
        fresh = encoder.encode([text_of[h] for h in missing], show_progress=show_progress, desc=desc)
        new = dict(zip(missing, fresh))
        if cache:
            cache.put_many(new)
        cached.update(new)
    out = np.empty((len(hashes), encoder.dim), dtype=np.float32)
    for i, h in enumerate(hashes):
        out[i] = cached[h]
    return out, len(missing)
