"""Dense vector search behind one small interface: FAISS (embedded default) or Qdrant.

The index's `vectors-<generation>.npy` is the source of truth; a backend is a
search structure over those rows, built at each write and addressed by row
number. Both backends take the same `allowed` rows so metadata filters apply
before the top-k cut.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from retro_peft.errors import IndexFormatError, InputError
from retro_peft.storage import atomic_write_bytes

BACKENDS = ("faiss", "qdrant")


class DenseBackend(ABC):
    spec: dict  # what the manifest records: backend name, kind, files, parameters

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: (scores, rows), each [n_queries, k]; missing slots have row -1."""

    def files(self) -> list[str]:
        return self.spec.get("files", [])

    def drop(self) -> None:
        """Release storage outside the index folder (Qdrant collections)."""

    def drop_older(self) -> None:
        """Release outside storage of generations before the previous one. The previous one stays: other
        processes (server replicas) may still be searching the manifest they opened."""

    def close(self) -> None:
        pass


def build_dense(backend: str, vectors: np.ndarray, folder: Path, generation: int, options: dict) -> DenseBackend:
    if backend == "faiss":
        return FaissBackend.build(vectors, folder, generation, options)
    if backend == "qdrant":
        return QdrantBackend.build(vectors, folder, generation, options)
    raise InputError(f"unknown dense backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def open_dense(spec: dict, vectors: np.ndarray, folder: Path) -> DenseBackend:
    if spec["backend"] == "faiss":
        return FaissBackend.open(spec, vectors, folder)
    if spec["backend"] == "qdrant":
        return QdrantBackend(spec, folder)
    raise InputError(f"unknown dense backend {spec['backend']!r} in the index manifest")


class FaissBackend(DenseBackend):
    """Exact inner-product search below `ann_threshold` vectors; HNSW or IVF above it."""

    def __init__(self, index, spec: dict):
        self.index = index
        self.spec = spec

    @classmethod
    def build(cls, vectors: np.ndarray, folder: Path, generation: int, options: dict) -> FaissBackend:
        import faiss

        n, dim = vectors.shape
        threshold = int(options.get("ann_threshold", 50_000))
        kind = "flat" if n < threshold else options.get("ann_kind", "hnsw")
        spec = {"backend": "faiss", "kind": kind, "dim": dim}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            spec.update(m=32, ef_construction=200, ef_search=128)
            index = faiss.IndexHNSWFlat(dim, spec["m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = spec["ef_construction"]
        elif kind == "ivf":
            nlist = max(1, int(np.sqrt(n)))
            spec.update(nlist=nlist, nprobe=max(1, nlist // 8))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        else:
            raise InputError(f"unknown FAISS index kind {kind!r}: choose flat, hnsw or ivf")
        if n:
            index.add(vectors)
        if kind != "flat":
            # Flat search is rebuilt from vectors.npy in milliseconds; graphs and
            # trained quantisers are worth storing.
            name = f"dense-{generation:06d}.faiss"
            atomic_write_bytes(folder / name, faiss.serialize_index(index).tobytes())
            spec["files"] = [name]
        return cls(index, spec)

    @classmethod
    def open(cls, spec: dict, vectors: np.ndarray, folder: Path) -> FaissBackend:
        import faiss

        if spec["kind"] == "flat":
            index = faiss.IndexFlatIP(spec["dim"])
            if len(vectors):
                index.add(vectors)
        else:
            index = faiss.deserialize_index(np.fromfile(folder / spec["files"][0], dtype=np.uint8))
        return cls(index, spec)

    def _params(self, allowed: np.ndarray | None):
        import faiss

        kwargs = {}
        if allowed is not None:
            kwargs["sel"] = faiss.IDSelectorBatch(allowed.astype(np.int64))
        if self.spec["kind"] == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=self.spec["ef_search"], **kwargs)
        if self.spec["kind"] == "ivf":
            return faiss.SearchParametersIVF(nprobe=self.spec["nprobe"], **kwargs)
        return faiss.SearchParameters(**kwargs) if kwargs else None

    def search(self, queries, k, allowed=None):
        k = min(k, self.index.ntotal)
        if k <= 0 or (allowed is not None and not len(allowed)):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = self._params(allowed)
        return self.index.search(queries, k, params=params) if params is not None else self.index.search(queries, k)


class QdrantBackend(DenseBackend):
    """Qdrant through qdrant-client: an embedded local folder, or a server URL; one code path.

    Each write creates a new collection `<prefix>-g<generation>`; the manifest
    points at it only once it is complete, so a crash mid-write leaves the last
    good collection in use.
    """

    def __init__(self, spec: dict, folder: Path):
        self.spec = spec
        self.client = _qdrant_client(spec, folder)

    @classmethod
    def build(cls, vectors, folder, generation, options):
        try:
            from qdrant_client import models
        except ImportError:
            raise InputError("the qdrant backend needs qdrant-client: pip install 'retro-peft[qdrant]'") from None
        # Collections are named after the index folder, so indexes can share a server.
        folder_id = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:8]
        prefix = options.get("qdrant_collection") or f"rp-{Path(folder).name}-{folder_id}"
        spec = {
            "backend": "qdrant", "kind": "hnsw", "dim": int(vectors.shape[1]),
            "url": options.get("qdrant_url"), "collection": f"{prefix}-g{generation:06d}",
        }
        backend = cls(spec, folder)
        client = backend.client
        if client.collection_exists(spec["collection"]):  # left by a crashed write of this generation
            client.delete_collection(spec["collection"])
        client.create_collection(
            spec["collection"], vectors_config=models.VectorParams(size=spec["dim"], distance=models.Distance.DOT)
        )
        for start in range(0, len(vectors), 1024):
            block = vectors[start : start + 1024]
            client.upsert(spec["collection"], points=models.Batch(
                ids=list(range(start, start + len(block))), vectors=block.tolist()), wait=True)
        return backend

    def search(self, queries, k, allowed=None):
        from qdrant_client import models

        n = len(queries)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        rows = np.full((n, k), -1, dtype=np.int64)
        if k <= 0 or (allowed is not None and not len(allowed)):
            return scores[:, :0], rows[:, :0]
        flt = None if allowed is None else models.Filter(must=[models.HasIdCondition(has_id=allowed.tolist())])
        requests = [models.QueryRequest(query=q.tolist(), limit=k, filter=flt) for q in queries]
        for i, response in enumerate(self.client.query_batch_points(self.spec["collection"], requests=requests)):
            for j, point in enumerate(response.points):
                scores[i, j], rows[i, j] = point.score, int(point.id)
        return scores, rows

    def drop(self):
        if self.client.collection_exists(self.spec["collection"]):
            self.client.delete_collection(self.spec["collection"])

    def drop_older(self):
        prefix, current = self.spec["collection"].rsplit("-g", 1)
        for c in self.client.get_collections().collections:
            head, _, gen = c.name.rpartition("-g")
            if head == prefix and gen.isdigit() and int(gen) < int(current) - 1:
                self.client.delete_collection(c.name)

    def close(self):
        if self.spec.get("url"):  # embedded clients are shared per folder, see _qdrant_client
            self.client.close()


_LOCAL_CLIENTS: dict[str, object] = {}


def _qdrant_client(spec: dict, folder: Path):
    from qdrant_client import QdrantClient

    if spec.get("url"):
        return QdrantClient(url=spec["url"])
    # The embedded Qdrant locks its folder: share one client per folder in a process.
    path = str((folder / "qdrant").resolve())
    if path not in _LOCAL_CLIENTS:
        try:
            _LOCAL_CLIENTS[path] = QdrantClient(path=path)
        except RuntimeError as e:
            if "already accessed" not in str(e):
                raise
            # Another process (a server, a running `index add`) holds the folder's lock.
            raise IndexFormatError(
                f"the embedded Qdrant store {path} is in use by another process (it locks {path}/.lock): "
                "stop that process, or build the index with --qdrant-url to share it through a Qdrant server"
            ) from None
    return _LOCAL_CLIENTS[path]
