"""The FastAPI app: OpenAI-compatible completions and chat over the adapter bank, plus search, operations and
the playground page (GET /).

    create_app(settings, bank=None)   # bank=None: load settings.model and the domains at start-up

The model is loaded in a background thread at start-up, so /health/live
answers at once and /health/ready turns 200 when every configured domain is
loaded. Generation goes through the `MicroBatcher` (one worker thread owns the
model); cache look-ups, auth and rate limits stay on the event loop.

The routes are in `routers/`, what they share in `state.py` and `dependencies.py`,
the middleware (and the response cache's fast path) in `middleware.py`.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from retro_peft import __version__, tracing
from retro_peft.serving import errors, logs, openapi
from retro_peft.serving.middleware import RequestContext
from retro_peft.serving.routers import generation, operations, playground, retrieval
from retro_peft.serving.settings import ServeSettings, load_settings
from retro_peft.serving.state import ServerState


def create_app(settings: ServeSettings | None = None, bank=None) -> FastAPI:
    settings = settings or load_settings()
    tracing.active()  # reads OTEL_* now: a misconfigured exporter stops the start, not a request
    state = ServerState(settings, bank)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.auth.warn_if_open()
        loader = asyncio.get_running_loop().run_in_executor(None, state.load)
        yield
        # uvicorn has stopped accepting connections and waited for those in flight; finish the queue.
        state.status = "draining"
        await loader
        if state.batcher is not None:
            await asyncio.to_thread(state.batcher.stop, settings.graceful_shutdown_s)
        for cache in {id(c): c for c in (state.response_cache, state.retrieval_cache) if c is not None}.values():
            await cache.close()

    app = FastAPI(title="retro-peft", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions over retrieval-augmented PEFT domains, with citations.")
    app.state.server = state
    errors.install(app)
    openapi.install(app)
    app.add_middleware(RequestContext, state=state)
    if settings.http.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.http.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    for router in (generation.router, retrieval.router, operations.router, playground.router):
        app.include_router(router)
    return app


def create_app_from_env() -> FastAPI:
    """For `uvicorn --factory` (several workers): the settings come from the environment."""
    settings = load_settings(os.environ.get("RETRO_PEFT_SERVE_CONFIG") or None)
    logs.configure(settings.log_level, settings.log_json)
    return create_app(settings)
