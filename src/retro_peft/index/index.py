"""The index: chunks + dense vectors + BM25, persisted as one folder.

Folder layout (generation g, six digits):

    manifest.json        format, version, encoder, chunking, dense spec, counts, checksums
    chunks-g.jsonl       one chunk a line: id, doc_id, text, metadata
    vectors-g.npy        float32 [n_chunks, dim], L2-normalised: the dense source of truth
    sparse-g/            bm25s index
    dense-g.faiss        only for HNSW/IVF (exact search is rebuilt from vectors-g.npy)

Every write (build, add, delete) produces a new generation beside the old one and
then replaces manifest.json atomically; only after that are the old files
removed. A crash at any point leaves a manifest that names complete files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np

from retro_peft import paths
from retro_peft.errors import EncoderMismatchError, IndexFormatError, InputError
from retro_peft.index.chunking import Chunk, ChunkingConfig, chunk_documents, text_hash
from retro_peft.index.dense import BACKENDS, DenseBackend, build_dense, open_dense
from retro_peft.index.documents import Document, load_documents
from retro_peft.index.embedding import EmbeddingCache, Encoder, embed_with_cache
from retro_peft.index.fusion import reciprocal_rank_fusion, weighted_score_fusion
from retro_peft.index.rerank import Reranker
from retro_peft.index.sparse import SparseIndex
from retro_peft.choices import SEARCH_MODES
from retro_peft.models import DEFAULT_ENCODER, PACKAGED
from retro_peft.storage import (atomic_write_bytes, atomic_write_json, atomic_write_with, remove, replace_folder,
                                sha256_tree)

log = logging.getLogger(__name__)

FORMAT = "retro-peft-index"
FORMAT_VERSION = 1
FUSIONS = ("rrf", "weighted")
# Filtered dense search scans the allowed rows exactly up to this many: ANN graphs
# and IVF lists can miss matches when a filter leaves few candidates.
EXACT_FILTERED_SEARCH = 20_000
_GENERATION_FILES = ("chunks-", "vectors-", "sparse-", "dense-", ".sparse-")


@dataclass
class IndexConfig:
    """How an index is built. Recorded in its manifest."""

    encoder: str = DEFAULT_ENCODER
    chunk_tokens: int = 192
    overlap: int = 32
    backend: str = "faiss"  # faiss | qdrant
    ann_threshold: int = 50_000  # FAISS: exact search below this many chunks, `ann_kind` above
    ann_kind: str = "hnsw"  # hnsw | ivf
    qdrant_url: str | None = None  # None: embedded Qdrant in the index folder
    embed_batch_size: int = 64
    # Contextual chunks: these metadata fields of a chunk's document (e.g. "title") are put before its text
    # in what is embedded and BM25-indexed; hits still show the chunk's own text. Recorded in the manifest.
    context: tuple[str, ...] = ()

    @property
    def chunking(self) -> ChunkingConfig:
        return ChunkingConfig(self.chunk_tokens, self.overlap)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.ann_kind not in ("hnsw", "ivf"):
            raise InputError(f"unknown ANN kind {self.ann_kind!r}: choose hnsw or ivf")
        if isinstance(self.context, str) or not all(isinstance(f, str) and f.strip() for f in self.context):
            raise InputError(f"context must be a list of metadata field names, got {self.context!r}")
        self.chunking.validate()


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    text: str
    score: float
    metadata: dict = field(default_factory=dict)

    @property
    def title(self) -> str | None:
        return self.metadata.get("title")

    def to_dict(self) -> dict:
        return asdict(self)


class Index:
    """An open index. Create one with `build_index` or `open_index`."""

    def __init__(self, path: Path, manifest: dict, chunks: list[Chunk], vectors: np.ndarray,
                 sparse: SparseIndex, dense: DenseBackend, encoder: Encoder | None = None):
        self.path = path
        self.manifest = manifest
        self._chunks = chunks
        self._vectors = vectors
        self._sparse = sparse
        self._dense = dense
        self._encoder = encoder
        self._filter_cache: dict[str, dict[str, np.ndarray]] = {}
        self._fields: set[str] | None = None  # metadata field names present in the chunks, and doc_id

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = _check_encoder(self, Encoder(self.encoder_name))
        return self._encoder

    def chunk_ids(self) -> list[str]:
        return [c.id for c in self._chunks]

    def doc_ids(self) -> list[str]:
        return list(dict.fromkeys(c.doc_id for c in self._chunks))

    def chunks(self) -> list[Chunk]:
        return list(self._chunks)

    def info(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path), "format_version": m["format_version"], "generation": m["generation"],
            "encoder": m["encoder"], "chunking": m["chunking"], "context": m.get("context", []),
            "dense": {k: v for k, v in m["dense"].items() if k != "files"},
            "counts": m["counts"], "created_at": m["created_at"], "updated_at": m["updated_at"],
        }

    def search(self, query: str, k: int = 5, mode: str = "hybrid", filters: dict | None = None, **options) -> list[Hit]:
        return self.search_many([query], k, mode, filters, **options)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, mode: str = "hybrid", filters: dict | None = None, *,
                    fusion: str = "weighted", weights: tuple[float, float] = (1.0, 1.0), depth: int | None = None,
                    rerank: Reranker | None = None, rerank_depth: int = 20,
                    query_vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-k chunks for each query.

        mode: dense | sparse | hybrid. Hybrid fuses the top `depth` (default
        max(4k, 40)) of each retriever by weighted min-max-normalised scores
        (the default: a convex combination, which Bruch et al. 2023 found more
        accurate than RRF; measured in BENCHMARKS.md) or by reciprocal rank
        fusion (k=60); `weights` = (dense, sparse).
        filters: {field: value or [values]}, exact match on chunk metadata (and
        `doc_id`; a list accepts any of its values), applied inside each
        retriever, before any top-k cut.
        rerank: re-scores the first `rerank_depth` fused candidates.
        query_vectors: precomputed query embeddings (skips the encoder).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if mode not in SEARCH_MODES:
            raise InputError(f"unknown search mode {mode!r}: choose one of {', '.join(SEARCH_MODES)}")
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion {fusion!r}: choose one of {', '.join(FUSIONS)}")
        if isinstance(queries, str):
            raise InputError("search_many takes a list of queries; use search() for one")
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise InputError("a query is empty")
        if not queries:
            return []
        allowed = self._allowed(filters)
        want = max(k, rerank_depth) if rerank else k
        n = want if mode != "hybrid" else (depth or max(4 * want, 40))

        dense = sparse = None
        if mode in ("dense", "hybrid"):
            if query_vectors is None:
                query_vectors = self.encoder.encode(list(queries))
            query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
            if allowed is not None and len(allowed) <= EXACT_FILTERED_SEARCH:
                dense = _exact_search(self._vectors, query_vectors, n, allowed)
            else:
                dense = self._dense.search(query_vectors, n, allowed)
        if mode in ("sparse", "hybrid"):
            sparse = self._sparse.search(list(queries), n, allowed)

        results = []
        for i, query in enumerate(queries):
            if mode == "dense":
                rows, scores = _valid(dense[1][i], dense[0][i])
            elif mode == "sparse":
                rows, scores = _valid(sparse[1][i], sparse[0][i])
            elif fusion == "rrf":
                rows, scores = reciprocal_rank_fusion([dense[1][i], sparse[1][i]], list(weights))
            else:
                rows, scores = weighted_score_fusion([(dense[0][i], dense[1][i]), (sparse[0][i], sparse[1][i])], list(weights))
            rows, scores = rows[:want], scores[:want]
            if rerank is not None and len(rows):
                scores = rerank.score(query, [self._chunks[r].text for r in rows.tolist()])
                order = np.argsort(-scores, kind="stable")
                rows, scores = rows[order], scores[order]
            results.append([self._hit(r, s) for r, s in zip(rows[:k].tolist(), scores[:k].tolist())])
        return results

    def _hit(self, row: int, score: float) -> Hit:
        c = self._chunks[row]
        return Hit(c.id, c.doc_id, c.text, float(score), c.metadata)

    def _allowed(self, filters: dict | None) -> np.ndarray | None:
        """Rows whose metadata matches every `field: value` (compared as strings; a list: any of its values)."""
        if not filters:
            return None
        if self._fields is None:
            self._fields = {"doc_id"}.union(*(c.metadata for c in self._chunks))
        allowed, none = None, np.zeros(0, np.int64)
        for name, value in filters.items():
            if name not in self._fields:
                # Matches nothing. Not cached: field names come from requests, and the
                # cache must stay bounded by the fields the chunks really have.
                return none
            if name not in self._filter_cache:
                groups: dict[str, list[int]] = {}
                for row, c in enumerate(self._chunks):
                    v = c.doc_id if name == "doc_id" else c.metadata.get(name)
                    if v is not None:
                        groups.setdefault(str(v), []).append(row)
                self._filter_cache[name] = {v: np.array(rs, dtype=np.int64) for v, rs in groups.items()}
            by_value = self._filter_cache[name]
            if isinstance(value, (list, tuple, set, frozenset)):  # any of them matches
                rows = np.unique(np.concatenate([by_value.get(str(v), none) for v in value] or [none]))
            else:  # the common case: the cached (sorted) rows as they are, no copy
                rows = by_value.get(str(value), none)
            allowed = rows if allowed is None else np.intersect1d(allowed, rows)
        return allowed

    # -- writing -------------------------------------------------------------------------------

    def add(self, inputs: Iterable[str | Path | Document], progress: bool = False) -> dict:
        """Add or update documents. A document whose id exists is replaced if its text changed."""
        docs = load_documents(inputs)
        chunking = ChunkingConfig(**self.manifest["chunking"])
        new_chunks = chunk_documents(docs, self.encoder.tokenizer, chunking)
        by_doc: dict[str, set[str]] = {}
        for c in self._chunks:
            by_doc.setdefault(c.doc_id, set()).add(c.id)
        incoming: dict[str, set[str]] = {}
        for c in new_chunks:
            incoming.setdefault(c.doc_id, set()).add(c.id)
        changed = {d for d, ids in incoming.items() if by_doc.get(d) != ids}
        stats = {
            "added": sum(d not in by_doc for d in changed), "replaced": sum(d in by_doc for d in changed),
            "unchanged": len(incoming) - len(changed),
        }
        if not changed:
            return stats
        keep = [row for row, c in enumerate(self._chunks) if c.doc_id not in changed]
        fresh = [c for c in new_chunks if c.doc_id in changed]
        vectors = _embed(self.encoder, fresh, progress, self.manifest.get("context", ()), desc="embed new chunks")
        chunks = [self._chunks[r] for r in keep] + fresh
        self._commit(chunks, np.concatenate([self._vectors[keep], vectors]) if keep else vectors)
        return stats

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; returns the number of chunks removed."""
        doc_ids = set(doc_ids)
        present = {c.doc_id for c in self._chunks}
        unknown = sorted(doc_ids - present)
        if unknown:
            raise InputError(f"no document with id {unknown[0]!r} in index {self.path}")
        keep = [row for row, c in enumerate(self._chunks) if c.doc_id not in doc_ids]
        if not keep:
            raise InputError("refusing to delete every document; remove the index folder instead")
        removed = len(self._chunks) - len(keep)
        self._commit([self._chunks[r] for r in keep], self._vectors[keep])
        return removed

    def reembed(self, encoder: str | Encoder, progress: bool = False) -> dict:
        """Embed every chunk again with another encoder (e.g. one `train_retriever` fine-tuned) and write a
        new generation that records it (name and fingerprint); until that commit, readers get the old one.

        The chunks stay as they are (cut by the old encoder's tokenizer); only their
        vectors change, and the embedding cache (one per encoder fingerprint) makes a
        repeated re-embed with the same encoder cost nothing.
        """
        if isinstance(encoder, str):
            encoder = Encoder(encoder)
        ChunkingConfig(**self.manifest["chunking"]).validate(encoder.max_tokens)
        previous = self.manifest["encoder"]
        described = {**encoder.describe(), "name": _recorded_name(encoder.name)}
        stats = {"chunks": len(self._chunks), "embedded": 0, "encoder": described, "previous_encoder": previous}
        if encoder.fingerprint == previous["fingerprint"]:
            return {**stats, "encoder": previous, "changed": False, "generation": self.manifest["generation"]}
        cache = EmbeddingCache(encoder)
        try:
            texts = indexed_texts(self._chunks, self.manifest.get("context", ()))
            vectors, stats["embedded"] = embed_with_cache(encoder, texts, [text_hash(t) for t in texts], cache,
                                                          show_progress=progress, desc="re-embed chunks")
        finally:
            cache.close()
        self._commit(self._chunks, vectors, {**self.manifest, "encoder": described})
        self._encoder = encoder
        return {**stats, "changed": True, "generation": self.manifest["generation"]}

    def _commit(self, chunks: list[Chunk], vectors: np.ndarray, previous: dict | None = None) -> None:
        with _write_lock(self.path):
            manifest, sparse, dense = _write_generation(self.path, previous or self.manifest, chunks, vectors,
                                                        _dense_options(self.manifest))
        self.manifest, self._chunks, self._vectors, self._sparse, self._dense = manifest, chunks, vectors, sparse, dense
        self._filter_cache.clear()
        self._fields = None
        dense.drop_older()

    def close(self) -> None:
        self._dense.close()


# -- building and opening ----------------------------------------------------------------------


def build_index(name_or_path: str | Path, inputs: Iterable[str | Path | Document], config: IndexConfig | None = None,
                *, overwrite: bool = False, progress: bool = False) -> Index:
    """Read, chunk, embed and index documents into a new index folder."""
    config = config or IndexConfig()
    config.validate()
    path = paths.resolve_index_path(name_or_path)
    old = read_manifest(path) if (path / "manifest.json").exists() else None
    if old and not overwrite:
        raise InputError(f"index {path} already exists: use overwrite (--overwrite) to rebuild it, or add to it")
    if not old and path.exists() and any(not _is_index_file(p.name) for p in path.iterdir()):
        raise InputError(f"{path} exists and is not a retro-peft index; choose another name")
    docs = load_documents(inputs)
    encoder = Encoder(config.encoder, batch_size=config.embed_batch_size)
    config.chunking.validate(encoder.max_tokens)
    chunks = chunk_documents(docs, encoder.tokenizer, config.chunking)
    log.info("%d documents -> %d chunks", len(docs), len(chunks))
    vectors = _embed(encoder, chunks, progress, config.context, desc="embed chunks")
    base = {
        "encoder": encoder.describe(),
        "chunking": {"chunk_tokens": config.chunk_tokens, "overlap": config.overlap},
        "context": list(config.context),
        "created_at": _now(),
        "generation": old["generation"] if old else 0,
        "dense": old["dense"] if old else {},
    }
    options = {"backend": config.backend, "ann_threshold": config.ann_threshold, "ann_kind": config.ann_kind,
               "qdrant_url": config.qdrant_url}
    path.mkdir(parents=True, exist_ok=True)
    with _write_lock(path):
        manifest, sparse, dense = _write_generation(path, base, chunks, vectors, options)
    with contextlib.suppress(Exception):
        if old and old["dense"].get("collection") and not dense.spec.get("collection"):
            open_dense(old["dense"], vectors[:0], path).drop()  # rebuilt on another backend
        dense.drop_older()
    return Index(path, manifest, chunks, vectors, sparse, dense, encoder)


def open_index(name_or_path: str | Path, encoder: str | Encoder | None = None, verify: bool = True) -> Index:
    """Open an existing index. `encoder`, if given, must be the one that built it."""
    path = paths.resolve_index_path(name_or_path)
    manifest = read_manifest(path)
    if verify:
        for name, digest in manifest["files"].items():
            if not (path / name).exists():
                raise IndexFormatError(f"index {path} is missing {name}")
            if sha256_tree(path / name) != digest:
                raise IndexFormatError(f"index {path} is corrupt: checksum mismatch for {name}")
    chunks = []
    with open(path / _file(manifest, "chunks-"), encoding="utf-8") as f:
        for line in f:
            o = json.loads(line)
            chunks.append(Chunk(o["id"], o["doc_id"], o["text"], o["metadata"]))
    vectors = np.load(path / _file(manifest, "vectors-"), allow_pickle=False)
    sparse = SparseIndex.load(path / _file(manifest, "sparse-"), len(chunks))
    dense = open_dense(manifest["dense"], vectors, path)
    index = Index(path, manifest, chunks, vectors, sparse, dense)
    if encoder is not None:
        if isinstance(encoder, str):
            encoder = Encoder(encoder) if encoder != index.encoder_name else index.encoder
        index._encoder = _check_encoder(index, encoder)
    return index


def _recorded_name(name: str) -> str:
    """The encoder name a manifest records: a local folder as an absolute path (it is loaded from any working
    directory), a packaged name or a Hugging Face id as given."""
    if name not in PACKAGED and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def _check_encoder(index: Index, encoder: Encoder) -> Encoder:
    recorded = index.manifest["encoder"]
    if encoder.fingerprint != recorded["fingerprint"]:
        raise EncoderMismatchError(
            f"index {index.path} was built with encoder {recorded['name']!r} (fingerprint {recorded['fingerprint']}), "
            f"but encoder {encoder.name!r} has fingerprint {encoder.fingerprint}; rebuild or re-embed the index "
            "(`retro-peft index reembed`) to change encoders"
        )
    return encoder


def read_manifest(path: Path) -> dict:
    if not path.exists():
        raise IndexFormatError(f"no index at {path}")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise IndexFormatError(f"{path} has no manifest.json: not an index, or its first build never finished") from None
    except json.JSONDecodeError:
        raise IndexFormatError(f"{path}/manifest.json is not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path} is not a retro-peft index (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(
            f"index {path} has format version {version!r}; this retro-peft reads up to {FORMAT_VERSION}: upgrade retro-peft"
        )
    return manifest


def _file(manifest: dict, prefix: str) -> str:
    return next(name for name in manifest["files"] if name.startswith(prefix))


def indexed_texts(chunks: list[Chunk], context) -> list[str]:
    """What the retrievers see of each chunk: its document's `context` fields (contextual chunks), then its
    text; without context fields, its text."""
    out = []
    for c in chunks:
        head = " - ".join(str(c.metadata[f]) for f in context if c.metadata.get(f) not in (None, ""))
        out.append(f"{head}\n{c.text}" if head else c.text)
    return out


def _embed(encoder: Encoder, chunks: list[Chunk], progress: bool, context=(), desc: str = "embed") -> np.ndarray:
    cache = EmbeddingCache(encoder)
    texts = indexed_texts(chunks, context)
    try:
        vectors, _ = embed_with_cache(encoder, texts, [text_hash(t) for t in texts], cache, show_progress=progress,
                                      desc=desc)
    finally:
        cache.close()
    return vectors


def _dense_options(manifest: dict) -> dict:
    spec = manifest["dense"]
    return {"backend": spec["backend"], "ann_threshold": spec.get("ann_threshold", 50_000),
            "ann_kind": spec.get("ann_kind", "hnsw"), "qdrant_url": spec.get("url")}


def _write_generation(path: Path, previous: dict, chunks: list[Chunk], vectors: np.ndarray, options: dict):
    """Write a complete new generation, then switch the manifest to it, then clean up.

    The caller holds the write lock. `previous` is the manifest the caller read
    (generation 0 for a new index); if another writer committed since, this
    writes nothing: writing from a stale manifest would drop that writer's
    documents and reuse its generation's file names, which the live manifest names.
    """
    _check_unchanged(path, int(previous.get("generation", 0)))
    gen = int(previous.get("generation", 0)) + 1
    names = {"chunks": f"chunks-{gen:06d}.jsonl", "vectors": f"vectors-{gen:06d}.npy", "sparse": f"sparse-{gen:06d}"}
    lines = (json.dumps({"id": c.id, "doc_id": c.doc_id, "text": c.text, "metadata": c.metadata}, ensure_ascii=False)
             for c in chunks)
    atomic_write_bytes(path / names["chunks"], ("\n".join(lines) + "\n").encode("utf-8"))
    def write_vectors(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)

    atomic_write_with(path / names["vectors"], write_vectors)
    sparse = SparseIndex.build(indexed_texts(chunks, previous.get("context", ())))
    tmp = path / f".{names['sparse']}.tmp"
    remove(tmp)
    sparse.save(tmp)
    replace_folder(tmp, path / names["sparse"])
    dense = build_dense(options["backend"], vectors, path, gen, options)
    dense.spec.update(ann_threshold=options["ann_threshold"], ann_kind=options["ann_kind"])
    files = [names["chunks"], names["vectors"], names["sparse"], *dense.files()]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "generation": gen,
        "encoder": previous["encoder"], "chunking": previous["chunking"], "context": previous.get("context", []),
        "dense": dense.spec,
        "counts": {"documents": len({c.doc_id for c in chunks}), "chunks": len(chunks)},
        "files": {name: sha256_tree(path / name) for name in files},
        "created_at": previous.get("created_at") or _now(), "updated_at": _now(),
    }
    atomic_write_json(path / "manifest.json", manifest)  # the commit point
    for entry in path.iterdir():  # the old generation, and leftovers of crashed writes
        if _is_generation_file(entry.name) and entry.name not in manifest["files"]:
            remove(entry)
    return manifest, sparse, dense


def _check_unchanged(path: Path, generation: int) -> None:
    current = read_manifest(path)["generation"] if (path / "manifest.json").exists() else 0
    if current != generation:
        raise IndexFormatError(
            f"index {path} changed since it was opened (generation {generation} -> {current}); reopen it and retry"
        )


def _is_generation_file(name: str) -> bool:
    return name.startswith(_GENERATION_FILES) or (name.startswith(".") and name.endswith(".tmp"))


def _is_index_file(name: str) -> bool:
    return _is_generation_file(name) or name in ("manifest.json", ".lock", "qdrant")


@contextlib.contextmanager
def _write_lock(path: Path):
    """One writer per index folder at a time, across processes."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray):
    """Brute-force top-k over the allowed rows: exact whatever the ANN structure."""
    k = min(k, len(allowed))
    scores = queries @ vectors[allowed].T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(allowed) else np.tile(np.arange(k), (len(queries), 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), allowed[np.take_along_axis(top, order, axis=1)]


def _valid(rows: np.ndarray, scores: np.ndarray):
    keep = rows >= 0
    return rows[keep], scores[keep]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
