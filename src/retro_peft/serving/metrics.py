"""Prometheus metrics, one registry per app (tests run several apps in one process).

With several uvicorn workers set PROMETHEUS_MULTIPROC_DIR (an empty folder):
prometheus-client then writes each worker's values there and /metrics adds
them up.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("retro_peft_requests", "HTTP requests", ["route", "status", "domain"], registry=r)
        self.latency = Histogram("retro_peft_request_duration_seconds", "HTTP request latency (to the last byte)",
                                 ["route", "status", "domain"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("retro_peft_prompt_tokens", "prompt tokens processed", ["domain"], registry=r)
        self.generated_tokens = Counter("retro_peft_generated_tokens", "tokens generated", ["domain"], registry=r)
        self.batch_size = Histogram("retro_peft_batch_size", "requests decoded together in one pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("retro_peft_queue_depth", "requests waiting for a batch", registry=r,
                                 multiprocess_mode="livesum")
        self.cache = Counter("retro_peft_cache", "cache look-ups", ["cache", "result"], registry=r)
        self.rejected = Counter("retro_peft_rejected", "requests refused for load or limits", ["reason"], registry=r)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
