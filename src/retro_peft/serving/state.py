"""`ServerState`: what every endpoint of one app shares (settings, auth, limits, caches, metrics, the bank
and its batcher), and the start-up that loads the model and the domains."""

from __future__ import annotations

import gc
import logging
import time

from fastapi.concurrency import run_in_threadpool

from retro_peft.domains.registry import AUTO, list_domains
from retro_peft.errors import RetroPeftError
from retro_peft.serving.auth import Authenticator
from retro_peft.serving.batcher import MicroBatcher
from retro_peft.serving.cache import RequestKeys, SemanticIndex, make_cache
from retro_peft.serving.errors import ApiError, busy
from retro_peft.serving.metrics import Metrics
from retro_peft.serving.ratelimit import RateLimiter
from retro_peft.serving.scheduler import ContinuousScheduler
from retro_peft.serving.settings import DomainConfig, ServeSettings

log = logging.getLogger("retro_peft.serving")
BASE = "base"  # the `model` reported when `auto` routes a question to no domain


class ServerState:
    """Everything the endpoints share; one per app."""

    def __init__(self, settings: ServeSettings, bank=None):
        self.settings = settings
        self.metrics = Metrics()
        env_keys = settings.api_keys.get_secret_value() if settings.api_keys else None
        self.auth = Authenticator(settings.auth, env_keys)
        self.limiter = RateLimiter(settings.limits) if settings.limits.enabled else None
        self.response_cache = make_cache(settings.cache, "responses") if settings.cache.enabled else None
        self.retrieval_cache = make_cache(settings.cache, "retrieval") \
            if settings.cache.enabled and settings.cache.retrieval else None
        # questions answered, by embedding: the semantic tier's look-up (the answers are in response_cache)
        self.semantic = SemanticIndex(settings.cache.semantic_threshold, settings.cache.max_entries) \
            if self.response_cache is not None and settings.cache.semantic else None
        # Request bytes already seen -> their response-cache key (see middleware.RequestContext._cache_hit).
        self.known_requests = RequestKeys(settings.cache.max_entries) if self.response_cache is not None else None
        self.bank = bank
        self.batcher: MicroBatcher | ContinuousScheduler | None = None
        self.status = "loading"
        self.domains: dict[str, str] = {}  # name -> "loaded" | "loading" | error
        self.descriptions: dict[str, str | None] = {}
        self.created = int(time.time())

    # -- start-up ----------------------------------------------------------------------------

    def _configured_domains(self) -> list[DomainConfig]:
        if self.settings.domains is not None:
            return list(self.settings.domains)
        return [DomainConfig(name=d.name, index=d.index, adapter=d.adapter, description=d.description,
                             kv_cache=d.kv_cache, kv_layout=d.kv_layout,
                             choices=None if d.choices is None else list(d.choices), abstain_at=d.abstain_at,
                             history=d.history)
                for d in list_domains()]

    def load(self) -> None:
        """Load the model and the domains (runs in a thread); a broken domain fails alone."""
        try:
            if self.bank is None:
                from retro_peft.domains.bank import AdapterBank  # torch, transformers, peft: only when serving

                specs = self._configured_domains()
                self.domains = {d.name: "loading" for d in specs}
                self.bank = AdapterBank(self.settings.model, max_adapters=self.settings.max_adapters,
                                        device=self.settings.device, dtype=self.settings.dtype,
                                        quantize=self.settings.quantize,
                                        quantize_skip=self.settings.quantize_skip,
                                        compile_decode=self.settings.compile_decode)
                for spec in specs:
                    self.descriptions[spec.name] = spec.description
                    try:
                        self.bank.load(spec.name, spec.index, spec.adapter, kv_cache=spec.kv_cache,
                                       kv_layout=spec.kv_layout, choices=spec.choices, abstain_at=spec.abstain_at,
                                       history=spec.history)
                        self.domains[spec.name] = "loaded"
                    except RetroPeftError as e:
                        self.domains[spec.name] = f"error: {e}"
                        log.error("domain %s failed to load: %s", spec.name, e)
            else:
                self.domains = {name: "loaded" for name in self.bank.domains}
            batching = ContinuousScheduler if self.settings.batching.mode == "continuous" else MicroBatcher
            self.batcher = batching(self.bank, self.settings.batching, self.metrics)
            self.batcher.start()
            # The model, tokenizers and libraries are ~500k long-lived objects; a full garbage
            # collection walks them all (measured: 340 ms with SmolLM2 loaded, 0 ms after freezing)
            # and stalls every request in flight. Freezing them leaves only request garbage to the collector.
            gc.collect()
            gc.freeze()
            self.status = "ok" if all(v == "loaded" for v in self.domains.values()) else "failed"
            log.info("ready", extra={"domains": self.domains})
        except Exception as e:  # noqa: BLE001 - keep serving /health so the failure is visible
            self.status = "failed"
            log.exception("the model failed to load: %s", e)

    # -- per request -------------------------------------------------------------------------

    def require_model(self):
        if self.batcher is None:
            raise busy("the model is still loading" if self.status == "loading" else "the model failed to load", 5,
                       "model_loading")
        return self.bank

    def resolve_domain(self, model: str) -> str:
        bank = self.require_model()
        if model == AUTO or model in bank.domains:
            return model
        known = ", ".join(sorted(bank.domains)) or "none"
        raise ApiError(404, f"the model {model!r} does not exist (domains: {known}, or {AUTO!r})", "not_found_error",
                       "model_not_found", "model")

    async def route(self, question: str) -> str | None:
        """The domain `auto` picks for `question` (None: none fits)."""
        try:
            return await run_in_threadpool(self.bank.route, question)
        except RetroPeftError as e:  # e.g. domains built with different encoders cannot be compared
            raise ApiError(400, f"{AUTO!r} cannot route this question: {e}; name a domain instead", param="model",
                           code="invalid_value") from None
