"""Caches: exact responses of deterministic requests, and retrieval results.

Both store bytes under a hashed key, with a TTL. In memory (per process) they
are also bounded in entries (least recently used goes first); in Redis, shared
by all replicas, the bound is the server's `maxmemory` with an LRU policy
(see deploy/k8s/redis.yaml). A Redis failure is a miss, never an error.

The response cache is used on the event loop (async client), the retrieval
cache from worker threads (sync client).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict

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


def make_cache(config) -> MemoryCache | RedisCache:
    if config.redis_url:
        return RedisCache(config.redis_url, config.ttl_s)
    return MemoryCache(config.ttl_s, config.max_entries)
