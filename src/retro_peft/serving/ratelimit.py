"""Per-key rate limits through the `limits` library: requests per minute and tokens per minute.

Storage is `memory://` for one replica, `redis://...` so that several replicas
share the counts. Tokens are counted at admission as prompt tokens +
max_tokens, as OpenAI does, since the real count is known only afterwards.
Every answer carries OpenAI's `x-ratelimit-*` headers; a refusal is 429 with
Retry-After. If the storage fails (Redis down) requests are let through and
the failure is logged: limits protect capacity, they are not authentication.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItemPerMinute
from limits.aio import strategies
from limits.storage import storage_from_string

from retro_peft.serving.errors import RateLimited
from retro_peft.serving.settings import LimitsConfig

log = logging.getLogger(__name__)

_STRATEGIES = {"moving-window": strategies.MovingWindowRateLimiter,
               "fixed-window": strategies.FixedWindowRateLimiter,
               "sliding-window-counter": strategies.SlidingWindowCounterRateLimiter}


class RateLimiter:
    def __init__(self, config: LimitsConfig):
        self.config = config
        uri = config.storage_uri if config.storage_uri.startswith("async+") else f"async+{config.storage_uri}"
        # redis-py (already a dependency) rather than limits' default async client, coredis.
        options = {"implementation": "redispy"} if "redis" in uri.split("://")[0] else {}
        self.storage = storage_from_string(uri, **options)
        self.strategy = _STRATEGIES[config.strategy](self.storage)
        self.requests = RateLimitItemPerMinute(config.requests_per_minute, namespace="retro-peft-requests")
        self.tokens = RateLimitItemPerMinute(config.tokens_per_minute, namespace="retro-peft-tokens")

    async def hit_request(self, key: str) -> dict[str, str]:
        """Count one request for `key`; the rate-limit headers, or RateLimited."""
        return await self._hit(self.requests, key, 1, "requests")

    async def hit_tokens(self, key: str, tokens: int) -> dict[str, str]:
        if tokens > self.config.tokens_per_minute:
            raise RateLimited(f"this request needs {tokens} tokens, more than this key's limit of "
                              f"{self.config.tokens_per_minute} per minute: lower max_tokens", {"Retry-After": "60"})
        return await self._hit(self.tokens, key, tokens, "tokens")

    async def _hit(self, item, key: str, cost: int, what: str) -> dict[str, str]:
        try:
            allowed = await self.strategy.hit(item, key, cost=cost)
            stats = await self.strategy.get_window_stats(item, key)
        except Exception as e:  # noqa: BLE001 - see the module docstring
            log.warning("rate-limit storage failed (%s); letting the request through", e)
            return {}
        reset = max(0.0, stats.reset_time - time.time())
        headers = {f"x-ratelimit-limit-{what}": str(item.amount),
                   f"x-ratelimit-remaining-{what}": str(stats.remaining),
                   f"x-ratelimit-reset-{what}": f"{reset:.3f}s"}
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(reset)))
            raise RateLimited(f"rate limit reached: {item.amount} {what} per minute for this key", headers)
        return headers
