"""Caches: exact responses of deterministic requests, and retrieval results; and the semantic tier.

Both caches store bytes under a hashed key, with a TTL, in tiers looked up in order (`TieredCache`):

- memory (per process), bounded in entries (least recently used goes first);
- disk (`cache.disk_dir`, per machine, shared by its worker processes, kept across restarts), bounded in
  bytes (`cache.disk_bytes`): diskcache, whose entries are rows of an SQLite database written in
  transactions (a crash leaves the previous state, never half an entry). Each value is stored with its
  SHA-256, checked on every read: damage that SQLite cannot see (a value file cut short, bytes
  overwritten) is a miss and the entry is dropped, never served;
- Redis, shared by all replicas, bounded by the server's `maxmemory` with an LRU policy
  (see deploy/k8s/redis.yaml). A Redis or disk failure is a miss, never an error.

A hit in a lower tier is copied into the tiers above it. The response cache is used on the event loop,
the retrieval cache from worker threads (sync clients); a disk look-up is one indexed SQLite read.

The semantic tier (`SemanticIndex`, opt-in: `cache.semantic`) answers a question from the cached answer
of an earlier question whose embedding (by the domain's own index encoder) is within
`cache.semantic_threshold` cosine of it, among questions asked with the same domain, settings and index
version. It holds embeddings and exact keys in memory (per process); the answers stay in the tiers above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def cache_key(namespace: str, payload) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return f"retro-peft:{namespace}:{hashlib.sha256(text.encode()).hexdigest()}"


class MemoryCache:
    def __init__(self, ttl_s: float, max_entries: int):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] < time.monotonic():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes) -> None:
        self.set(key, value)

    def __len__(self) -> int:
        return len(self._data)

    async def close(self) -> None:
        pass


class RedisCache:
    def __init__(self, url: str, ttl_s: float):
        import redis
        import redis.asyncio

        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._sync = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._async = redis.asyncio.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._errors = (redis.RedisError, OSError)

    def get(self, key: str) -> bytes | None:
        try:
            return self._sync.get(key)
        except self._errors as e:
            log.warning("redis cache get failed: %s", e)
            return None

    def set(self, key: str, value: bytes) -> None:
        try:
            self._sync.set(key, value, px=self.ttl_ms)
        except self._errors as e:
            log.warning("redis cache set failed: %s", e)

    async def aget(self, key: str) -> bytes | None:
        try:
            return await self._async.get(key)
        except self._errors as e:
            log.warning("redis cache get failed: %s", e)
            return None

    async def aset(self, key: str, value: bytes) -> None:
        try:
            await self._async.set(key, value, px=self.ttl_ms)
        except self._errors as e:
            log.warning("redis cache set failed: %s", e)

    async def close(self) -> None:
        await self._async.aclose()
        self._sync.close()


class DiskCache:
    """Entries in a directory that outlives the process (see the module's docstring: diskcache, checksummed)."""

    DIGEST = 32  # bytes of SHA-256 in front of each stored value

    def __init__(self, directory: str | Path, ttl_s: float, size_limit: int):
        import diskcache

        self.ttl_s = ttl_s
        # least-recently-stored eviction: the LRU policy would write to the database on every read
        self._cache = diskcache.Cache(str(directory), size_limit=size_limit, eviction_policy="least-recently-stored")
        self._errors = (OSError, diskcache.Timeout, sqlite3.Error)

    def get(self, key: str) -> bytes | None:
        try:
            stored = self._cache.get(key)
        except self._errors as e:
            log.warning("disk cache get failed: %s", e)
            return None
        if stored is None:
            return None
        value = stored[self.DIGEST:] if isinstance(stored, bytes) else None
        if value is None or hashlib.sha256(value).digest() != stored[:self.DIGEST]:
            log.warning("disk cache: a damaged entry was dropped, not served (%s)", key)
            try:
                self._cache.delete(key)
            except self._errors:
                pass
            return None
        return value

    def set(self, key: str, value: bytes) -> None:
        try:
            self._cache.set(key, hashlib.sha256(value).digest() + value, expire=self.ttl_s)
        except self._errors as e:
            log.warning("disk cache set failed: %s", e)

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes) -> None:
        self.set(key, value)

    async def close(self) -> None:
        self._cache.close()


class TieredCache:
    """Tiers looked up in order, fastest first; a hit is copied into the tiers above it, a value set in all."""

    def __init__(self, tiers: list):
        self.tiers = tiers

    def get(self, key: str) -> bytes | None:
        for i, tier in enumerate(self.tiers):
            value = tier.get(key)
            if value is not None:
                for upper in self.tiers[:i]:
                    upper.set(key, value)
                return value
        return None

    def set(self, key: str, value: bytes) -> None:
        for tier in self.tiers:
            tier.set(key, value)

    async def aget(self, key: str) -> bytes | None:
        for i, tier in enumerate(self.tiers):
            value = await tier.aget(key)
            if value is not None:
                for upper in self.tiers[:i]:
                    await upper.aset(key, value)
                return value
        return None

    async def aset(self, key: str, value: bytes) -> None:
        for tier in self.tiers:
            await tier.aset(key, value)

    async def close(self) -> None:
        for tier in self.tiers:
            await tier.close()


_PUNCTUATION = re.compile(r"[^\w\s']+")
_CONTRACTIONS = [(re.compile(r"\b(what|who|where|when|how|why|which|that|it|there)'s\b"), r"\1 is"),
                 (re.compile(r"\bcan't\b"), "can not"), (re.compile(r"\bwon't\b"), "will not"),
                 (re.compile(r"n't\b"), " not")]
# Words a rewording adds or drops without changing the question: articles and the framing of a request
# ("could you tell me ...", "I would like to know ..."). Every other word (question words, negations, names,
# numbers, verbs and their tense) must be the same, in the same order, in both questions for a semantic hit.
FILLER_WORDS = frozenset("a an the please could can would you tell me i like to know do want wonder kindly".split())


def semantic_text(question: str) -> str:
    """What the semantic tier embeds: the question lower-cased, contractions spelt out, without punctuation or
    repeated spaces (a dropped "?" alone moves MiniLM's embedding as far as another question word does)."""
    text = question.lower()
    for pattern, full in _CONTRACTIONS:
        text = pattern.sub(full, text)
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def content_words(question: str) -> tuple[str, ...]:
    """The question's words but the filler, in order: two questions are rewordings only if these are equal (in
    order: "When was A renamed from B?" is not "When was B renamed from A?")."""
    return tuple(w for w in semantic_text(question).split() if w not in FILLER_WORDS)


class SemanticIndex:
    """Questions already answered, as unit embeddings, per bucket (everything a response's key holds but the
    question), each pointing to its exact cache key; at most `max_entries` in all (the oldest bucket's oldest
    go first). Used on the event loop only.

    A hit needs the embedding's cosine to reach `threshold` and, with `same_words` (the server's), the same
    content words in the same order: embeddings alone put SQuAD 2.0's one-word edits ("What is an example ..." / "What is
    not example ...": 0.998) above any threshold a paraphrase reaches (measured: BENCHMARKS.md).
    """

    def __init__(self, threshold: float, max_entries: int, same_words: bool = True):
        self.threshold, self.max_entries, self.same_words, self.size = threshold, max_entries, same_words, 0
        # bucket -> its entries, oldest first: (embedding, content words, exact key)
        self._buckets: OrderedDict[str, list[tuple[np.ndarray, tuple[str, ...], str]]] = OrderedDict()

    def nearest(self, bucket: str, question: str, vector: np.ndarray) -> str | None:
        """The key of the cached question most similar to `question` (embedded: `vector`) that is a hit."""
        entries = self._buckets.get(bucket)
        if not entries:
            return None
        words = content_words(question) if self.same_words else None
        similarities = np.stack([e[0] for e in entries]) @ vector
        best = None
        for i in np.flatnonzero(similarities >= self.threshold):
            if (words is None or entries[i][1] == words) and (best is None or similarities[i] > similarities[best]):
                best = i
        return None if best is None else entries[best][2]

    def add(self, bucket: str, question: str, vector: np.ndarray, key: str) -> None:
        entries = self._buckets.setdefault(bucket, [])
        self._buckets.move_to_end(bucket)
        if any(e[2] == key for e in entries):
            return
        entries.append((np.asarray(vector, dtype=np.float32), content_words(question), key))
        self.size += 1
        while self.size > self.max_entries:
            oldest = next(iter(self._buckets.values()))
            del oldest[0]
            self.size -= 1
            if not oldest:
                self._buckets.popitem(last=False)


class RequestKeys:
    """Request bytes -> what the full path worked out for them (cache key, ...), least recently used first out.

    Lets a byte-identical repeat of a cacheable request skip validation and key building;
    per process, since it only saves CPU. Bounded in entries and in bytes held (bodies can be 1 MiB).
    """

    def __init__(self, max_entries: int, max_bytes: int = 64 << 20):
        self.max_entries, self.max_bytes, self.bytes = max_entries, max_bytes, 0
        self._data: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, request: tuple) -> tuple | None:
        found = self._data.get(request)
        if found is not None:
            self._data.move_to_end(request)
        return found

    def put(self, request: tuple, value: tuple) -> None:
        if request in self._data:
            self._data.move_to_end(request)
            return
        self._data[request] = value
        self.bytes += len(request[-1])
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            old, _ = self._data.popitem(last=False)
            self.bytes -= len(old[-1])


def make_cache(config, name: str) -> MemoryCache | TieredCache:
    """The cache `name` ("responses", "retrieval"): memory, then disk (`disk_dir/name`) and Redis if configured."""
    memory = MemoryCache(config.ttl_s, config.max_entries)
    tiers = [memory]
    if config.disk_dir:
        tiers.append(DiskCache(Path(config.disk_dir) / name, config.ttl_s, config.disk_bytes))
    if config.redis_url:
        tiers.append(RedisCache(config.redis_url, config.ttl_s))
    return memory if len(tiers) == 1 else TieredCache(tiers)
