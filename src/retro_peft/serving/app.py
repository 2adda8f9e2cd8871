"""The FastAPI app: OpenAI-compatible completions and chat over the adapter bank, plus search and operations.

    create_app(settings, bank=None)   # bank=None: load settings.model and the domains at start-up

The model is loaded in a background thread at start-up, so /health/live
answers at once and /health/ready turns 200 when every configured domain is
loaded. Generation goes through the `MicroBatcher` (one worker thread owns the
model); cache look-ups, auth and rate limits stay on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from retro_peft.errors import InputError, RetroPeftError
from retro_peft.generation import Answer, SamplingConfig, SearchOptions
from retro_peft.serving import errors, schemas
from retro_peft.serving.auth import Authenticator, Principal, forbidden
from retro_peft.serving.batcher import MicroBatcher, QueueFull, RequestTimeout
from retro_peft.serving.cache import RequestKeys, cache_key, make_cache
from retro_peft.serving.errors import ApiError, busy
from retro_peft.serving.logs import request_id
from retro_peft.serving.metrics import Metrics
from retro_peft.serving.ratelimit import RateLimiter
from retro_peft.serving.settings import DomainConfig, ServeSettings, load_settings

log = logging.getLogger("retro_peft.serving")
access_log = logging.getLogger("retro_peft.serving.access")
AUTO = "auto"
BASE = "base"  # the `model` reported when `auto` routes a question to no domain

_ERRORS = {s: {"model": schemas.ErrorResponse} for s in (400, 401, 403, 404, 413, 429, 503)}
_STREAM = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                 "description": "JSON, or with `stream: true` server-sent events ending with `data: [DONE]`"}}


class ServerState:
    """Everything the endpoints share; one per app."""

    def __init__(self, settings: ServeSettings, bank=None):
        self.settings = settings
        self.metrics = Metrics()
        env_keys = settings.api_keys.get_secret_value() if settings.api_keys else None
        self.auth = Authenticator(settings.auth, env_keys)
        self.limiter = RateLimiter(settings.limits) if settings.limits.enabled else None
        self.response_cache = make_cache(settings.cache) if settings.cache.enabled else None
        self.retrieval_cache = make_cache(settings.cache) if settings.cache.enabled and settings.cache.retrieval \
            else None
        # Request bytes already seen -> their response-cache key (see RequestContext._cache_hit).
        self.known_requests = RequestKeys(settings.cache.max_entries) if self.response_cache is not None else None
        self.bank = bank
        self.batcher: MicroBatcher | None = None
        self.status = "loading"
        self.domains: dict[str, str] = {}  # name -> "loaded" | "loading" | error
        self.descriptions: dict[str, str | None] = {}
        self.created = int(time.time())

    # -- start-up ----------------------------------------------------------------------------

    def _configured_domains(self) -> list[DomainConfig]:
        if self.settings.domains is not None:
            return list(self.settings.domains)
        from retro_peft.domains.registry import list_domains

        return [DomainConfig(name=d.name, index=d.index, adapter=d.adapter, description=d.description,
                             kv_cache=d.kv_cache, kv_layout=d.kv_layout)
                for d in list_domains()]

    def load(self) -> None:
        """Load the model and the domains (runs in a thread); a broken domain fails alone."""
        try:
            if self.bank is None:
                from retro_peft.domains.bank import AdapterBank

                specs = self._configured_domains()
                self.domains = {d.name: "loading" for d in specs}
                self.bank = AdapterBank(self.settings.model, max_adapters=self.settings.max_adapters,
                                        device=self.settings.device, dtype=self.settings.dtype)
                for spec in specs:
                    self.descriptions[spec.name] = spec.description
                    try:
                        self.bank.load(spec.name, spec.index, spec.adapter, kv_cache=spec.kv_cache,
                                       kv_layout=spec.kv_layout)
                        self.domains[spec.name] = "loaded"
                    except RetroPeftError as e:
                        self.domains[spec.name] = f"error: {e}"
                        log.error("domain %s failed to load: %s", spec.name, e)
            else:
                self.domains = {name: "loaded" for name in self.bank.domains}
            self.batcher = MicroBatcher(self.bank, self.settings.batching, self.metrics)
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


# -- dependencies -----------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="an API key or a JWT")


def _state(request: Request) -> ServerState:
    return request.app.state.server


@functools.cache
def authorized(scope: str | None):
    """The caller, checked for `scope` (None: any valid credential), counted against its request limit."""

    async def dependency(request: Request,
                         credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Principal:
        state = _state(request)
        principal = state.auth.authenticate(credentials.credentials if credentials else None)
        if scope is not None and not principal.allows(scope):
            raise forbidden(scope)
        if state.limiter is not None:
            try:
                request.state.extra_headers.update(await state.limiter.hit_request(principal.name))
            except ApiError:
                state.metrics.rejected.labels("rate_limit").inc()
                raise
        return principal

    return dependency


# -- the app ----------------------------------------------------------------------------------

def create_app(settings: ServeSettings | None = None, bank=None) -> FastAPI:
    settings = settings or load_settings()
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

    app = FastAPI(title="retro-peft", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions over retrieval-augmented PEFT domains, with citations.")
    app.state.server = state
    errors.install(app)
    app.add_middleware(RequestContext, state=state)
    if settings.http.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.http.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.post("/v1/completions", response_model=schemas.CompletionResponse, responses={**_ERRORS, **_STREAM},
              tags=["generation"])
    async def completions(body: schemas.CompletionRequest, request: Request,
                          principal: Principal = Depends(authorized("generate"))):
        questions = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        return await _generate(state, request, principal, body, questions, chat=False)

    @app.post("/v1/chat/completions", response_model=schemas.ChatResponse, responses={**_ERRORS, **_STREAM},
              tags=["generation"])
    async def chat_completions(body: schemas.ChatRequest, request: Request,
                               principal: Principal = Depends(authorized("generate"))):
        return await _generate(state, request, principal, body, [_question(body)], chat=True)

    @app.post("/v1/retrieve", response_model=schemas.RetrieveResponse, responses=_ERRORS, tags=["retrieval"])
    async def retrieve(body: schemas.RetrieveRequest, request: Request,
                       principal: Principal = Depends(authorized("retrieve"))):
        return await _retrieve(state, request, body)

    @app.get("/v1/models", response_model=schemas.ModelList, responses=_ERRORS, tags=["models"])
    async def models(principal: Principal = Depends(authorized(None))):
        bank = state.require_model()
        cards = [schemas.ModelCard(id=name, created=state.created, description=state.descriptions.get(name),
                                   adapter=d.adapter_dir is not None) for name, d in sorted(bank.domains.items())]
        cards.append(schemas.ModelCard(id=AUTO, created=state.created, description="route each question to a domain"))
        return schemas.ModelList(data=cards)

    @app.get("/health/live", response_model=schemas.Health, tags=["operations"])
    async def live():
        return schemas.Health(status="ok")

    @app.get("/health/ready", response_model=schemas.Health, responses={503: {"model": schemas.Health}},
             tags=["operations"])
    async def ready():
        health = schemas.Health(status=state.status, domains=state.domains)
        return JSONResponse(health.model_dump(), status_code=200 if state.status == "ok" else 503)

    @app.get("/metrics", response_class=Response, responses={**_ERRORS, 200: {"content": {CONTENT_TYPE_LATEST: {}}}},
             tags=["operations"])
    async def metrics(principal: Principal = Depends(authorized("admin"))):
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_env() -> FastAPI:
    """For `uvicorn --factory` (several workers): the settings come from the environment."""
    from retro_peft.serving import logs

    settings = load_settings(os.environ.get("RETRO_PEFT_SERVE_CONFIG") or None)
    logs.configure(settings.log_level, settings.log_json)
    return create_app(settings)


def _version() -> str:
    from retro_peft import __version__

    return __version__


# -- generation -------------------------------------------------------------------------------

def _question(body: schemas.ChatRequest) -> str:
    """The last user message is the question: the bank answers one question from its domain's passages
    (earlier turns and system messages are not part of its prompt)."""
    for message in reversed(body.messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, list):
                content = "\n".join(part.text for part in content)
            return content or ""
    raise ApiError(400, "messages: there is no user message to answer", param="messages", code="invalid_value")


def _sampling(state: ServerState, body, chat: bool) -> SamplingConfig:
    limits = state.settings.generation
    max_tokens = (body.max_completion_tokens if chat else None) or body.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > state.settings.http.max_stop or any(not s for s in stop):
        raise ApiError(400, f"stop: at most {state.settings.http.max_stop} non-empty strings", param="stop",
                       code="invalid_value")
    temperature = limits.default_temperature if body.temperature is None else body.temperature
    try:
        return SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, stop=tuple(stop), seed=body.seed or 0)
    except InputError as e:
        raise ApiError(400, str(e), code="invalid_value") from None


def _retrieval(state: ServerState, options: schemas.RetrievalOptions | None) -> SearchOptions | None:
    if options is None:
        return None
    if options.k is not None and options.k > state.settings.http.max_k:
        raise ApiError(400, f"retrieval.k is at most {state.settings.http.max_k}", param="retrieval.k",
                       code="invalid_value")
    search = SearchOptions.of(options.k, options.mode, options.filters)
    return None if search == SearchOptions() else search


async def _generate(state: ServerState, request: Request, principal: Principal, body, questions: list[str],
                    chat: bool):
    request.state.domain = body.model
    model = state.resolve_domain(body.model)
    limits = state.settings.generation
    if not questions or len(questions) > limits.max_prompts_per_request:
        raise ApiError(400, f"prompt: give 1 to {limits.max_prompts_per_request} prompts", param="prompt",
                       code="invalid_value")
    if any(not isinstance(q, str) or not q.strip() for q in questions):
        raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt", code="invalid_value")
    if body.stream and len(questions) > 1:
        raise ApiError(400, "stream: one prompt per streamed request", param="stream", code="invalid_value")
    sampling = _sampling(state, body, chat)
    retrieval = _retrieval(state, body.retrieval)
    kind = "chat.completion" if chat else "text_completion"

    # Greedy answers are a function of (domain, question, settings): serve them from the cache.
    key = None
    if state.response_cache is not None and sampling.greedy and not body.stream:
        key = cache_key(kind, [model, state.bank.version(model), questions, sampling.max_new_tokens, sampling.stop,
                               retrieval])
        identity = getattr(request.state, "request_identity", None)  # set by RequestContext
        if identity is not None:
            state.known_requests.put(identity, (key, kind, body.model))
        cached = await state.response_cache.aget(key)
        state.metrics.cache.labels("response", "hit" if cached is not None else "miss").inc()
        if cached is not None:
            request.state.extra_headers["x-cache"] = "hit"
            return Response(_with_id(cached, kind), media_type="application/json")

    tokenizer = state.bank.tokenizer
    counts = [len(tokenizer(q, add_special_tokens=False).input_ids) for q in questions]
    if max(counts) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {max(counts)} tokens; this server allows at most "
                       f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    if state.limiter is not None:
        try:
            request.state.extra_headers.update(
                await state.limiter.hit_tokens(principal.name, sum(counts) + sampling.max_new_tokens * len(questions)))
        except ApiError:
            state.metrics.rejected.labels("rate_limit").inc()
            raise

    domains = [await _route(state, q) for q in questions] if model == AUTO else [model] * len(questions)
    if body.stream:
        return _stream(state, request, body, questions[0], domains[0], sampling, retrieval, chat)
    batcher = state.batcher
    jobs = []
    try:
        for q, d in zip(questions, domains):
            jobs.append(batcher.submit(q, d, sampling, None, retrieval))
    except QueueFull as e:
        for job in jobs:
            batcher.cancel(job)
        state.metrics.rejected.labels("queue_full").inc()
        raise busy(str(e), e.retry_after) from None
    answers = await _wait_all(state, request, jobs)
    if answers is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    reported = domains[0] if model == AUTO else model
    payload = _payload(answers, kind, reported or BASE)
    _count_tokens(state, answers, domains)
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    if key is not None:
        await state.response_cache.aset(key, encoded)
        request.state.extra_headers["x-cache"] = "miss"
    return Response(_with_id(encoded, kind), media_type="application/json")


async def _route(state: ServerState, question: str) -> str | None:
    try:
        return await run_in_threadpool(state.bank.route, question)
    except RetroPeftError as e:  # e.g. domains built with different encoders cannot be compared
        raise ApiError(400, f"{AUTO!r} cannot route this question: {e}; name a domain instead", param="model",
                       code="invalid_value") from None


async def _wait_all(state: ServerState, request: Request, jobs) -> list[Answer] | None:
    """The jobs' answers, or None if the client disconnects first (then their generation stops)."""
    waits = [asyncio.ensure_future(state.batcher.wait(job)) for job in jobs]
    gathered = asyncio.gather(*waits)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if gathered not in done:
            return None
        return gathered.result()
    except RequestTimeout as e:
        state.metrics.rejected.labels("timeout").inc()
        raise busy(str(e), e.retry_after, "timeout") from None
    except RetroPeftError as e:
        raise _generation_error(e) from None
    finally:
        watcher.cancel()
        for wait, job in zip(waits, jobs):
            if not wait.done():
                job.cancelled = True
                wait.cancel()
        gathered.cancel()
        if gathered.done() and not gathered.cancelled():
            gathered.exception()  # retrieved: no "never retrieved" warning


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _generation_error(e: RetroPeftError) -> ApiError:
    from retro_peft.domains.bank import DomainError

    if isinstance(e, DomainError):
        return busy(f"domain unavailable: {e}", 30, "domain_unavailable")
    return ApiError(400, str(e), code="invalid_value")


def _citations(answer: Answer) -> list[dict]:
    return [{"chunk_id": c[0], "doc_id": c[1], "title": c[2], "score": c[3]} for c in answer.citations]


def _payload(answers: list[Answer], kind: str, model: str) -> dict:
    """The response without `id` and `created` (added per response, so cached bodies get fresh ones)."""
    choices = []
    for i, a in enumerate(answers):
        choice = {"index": i}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": a.text}
        else:
            choice["text"] = a.text
        choice.update(logprobs=None, finish_reason=a.finish_reason, citations=_citations(a))
        choices.append(choice)
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.completion_tokens for a in answers)
    return {"object": kind, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def new_request_id() -> str:
    """Unique, not secret: a random prefix per process and a counter (uuid4 per request cost 5% of a cached one)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


_ID_PREFIX, _ID_COUNTER = uuid.uuid4().hex[:16], itertools.count()


def _new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{new_request_id()}"


def _with_id(encoded: bytes, kind: str) -> bytes:
    return b'{"id":"%s","created":%d,' % (_new_id(kind).encode(), int(time.time())) + encoded[1:]


def _count_tokens(state: ServerState, answers: list[Answer], domains: list[str | None]) -> None:
    for a, d in zip(answers, domains):
        state.metrics.prompt_tokens.labels(d or BASE).inc(a.prompt_tokens)
        state.metrics.generated_tokens.labels(d or BASE).inc(a.completion_tokens)


def _stream(state: ServerState, request: Request, body, question: str, domain: str | None,
            sampling: SamplingConfig, retrieval, chat: bool) -> StreamingResponse:
    """SSE in OpenAI's chunk format. The job is queued before the 200 goes out, so a full queue is a 503."""
    kind = "chat.completion" if chat else "text_completion"
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    deltas: asyncio.Queue[str] = asyncio.Queue()
    try:
        job = state.batcher.submit(question, domain, sampling, deltas.put_nowait, retrieval)
    except QueueFull as e:
        state.metrics.rejected.labels("queue_full").inc()
        raise busy(str(e), e.retry_after) from None
    ident, created = _new_id(kind), int(time.time())
    model = (domain or BASE) if body.model == AUTO else body.model
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def event(choices: list[dict], **extra) -> bytes:
        data = {"id": ident, "object": chunk_kind, "created": created, "model": model, "choices": choices, **extra}
        return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def choice(text: str | None, finish: str | None = None, **extra) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish, **extra}

    async def events():
        waiter = asyncio.ensure_future(state.batcher.wait(job))
        try:
            if chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            while True:
                getter = asyncio.ensure_future(deltas.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield event([choice(getter.result())])
                    continue
                getter.cancel()
                break
            while not deltas.empty():
                yield event([choice(deltas.get_nowait())])
            try:
                answer = waiter.result()
            except (RequestTimeout, RetroPeftError) as e:
                error = busy(str(e), 1, "timeout") if isinstance(e, RequestTimeout) else _generation_error(e)
                yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            usage = _payload([answer], kind, model)["usage"]
            _count_tokens(state, [answer], [domain])
            yield event([choice(None, answer.finish_reason, citations=_citations(answer))], usage=usage)
            if include_usage:
                yield event([], usage=usage)
            yield b"data: [DONE]\n\n"
        finally:  # the client disconnected (the response was cancelled) or we are done
            if not waiter.done():
                job.cancelled = True
                waiter.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- retrieval --------------------------------------------------------------------------------

async def _retrieve(state: ServerState, request: Request, body: schemas.RetrieveRequest):
    request.state.domain = body.model
    model = state.resolve_domain(body.model)
    if body.k > state.settings.http.max_k:
        raise ApiError(400, f"k is at most {state.settings.http.max_k}", param="k", code="invalid_value")
    if not body.query.strip():  # as an empty prompt: refused before routing or searching
        raise ApiError(400, "the query is empty", param="query", code="invalid_value")
    domain = await _route(state, body.query) if model == AUTO else model
    if domain is None:  # no domain fits the question
        return schemas.RetrieveResponse(model=BASE, data=[])
    key = None
    if state.retrieval_cache is not None:
        key = cache_key("retrieve", [domain, state.bank.domains[domain].index_version, body.query, body.k, body.mode,
                                     body.filters])
        cached = await state.retrieval_cache.aget(key)
        state.metrics.cache.labels("retrieval", "hit" if cached is not None else "miss").inc()
        if cached is not None:
            request.state.extra_headers["x-cache"] = "hit"
            return Response(cached, media_type="application/json")
    index = state.bank.domains[domain].index
    try:
        hits = await run_in_threadpool(index.search, body.query, k=body.k, mode=body.mode, filters=body.filters)
    except RetroPeftError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    payload = {"object": "list", "model": domain, "data": [h.to_dict() for h in hits]}
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str).encode()
    if key is not None:
        await state.retrieval_cache.aset(key, encoded)
    return Response(encoded, media_type="application/json")


# -- request context --------------------------------------------------------------------------

class RequestContext:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware, and it does not break streaming):
    request id, body-size bound, headers set by dependencies, metrics and one access-log line.

    It also answers repeats of cacheable requests (`_cache_hit`): a request whose exact bytes
    the full path has already validated and keyed is looked up in the response cache here, after
    the same auth, scope and rate-limit checks, without FastAPI's routing, validation and
    dependency solving (measured in-process: 165-175 -> 23 us of CPU per cached request).
    Anything else, a miss included, takes the full path.
    """

    CACHEABLE = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.max_body = state.settings.http.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or new_request_id()
        token = request_id.set(rid)
        context = scope.setdefault("state", {})
        context["extra_headers"] = {}
        status = [500]
        path = None  # the route, when this middleware answers itself

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0], context["response_started"] = message["status"], True
                extra = [(b"x-request-id", rid.encode("latin-1"))]
                extra += [(k.encode(), str(v).encode()) for k, v in context["extra_headers"].items()]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        try:
            length = headers.get(b"content-length")
            cacheable = (self.state.known_requests is not None and scope["method"] == "POST"
                         and scope["path"] in self.CACHEABLE)
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise BodyTooLarge
            if cacheable or (length is None and scope["method"] not in ("GET", "HEAD")):
                # Without a Content-Length (chunked) the server bounds nothing: read and count the body here,
                # before anything holds it whole (GET and HEAD endpoints never read one).
                body, receive = await _buffered(receive, self.max_body)
            if cacheable:
                if body is not None:  # what makes two requests the same before validation
                    context["request_identity"] = (scope["path"], headers.get(b"content-type"), body)
                if await self._cache_hit(scope, context, headers, receive, send_with_headers):
                    path = scope["path"]
                else:
                    await self._app_answering_500(scope, receive, send_with_headers)
            else:
                await self._app_answering_500(scope, receive, send_with_headers)
        except BodyTooLarge:
            error = ApiError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
            await error.response()(scope, receive, send_with_headers)
        finally:
            path = path or getattr(scope.get("route"), "path", "unmatched")
            domain = str(context.get("domain", ""))[:64] if path.startswith("/v1/") else ""
            if domain and domain != AUTO and (self.state.bank is None or domain not in self.state.bank.domains):
                domain = "unknown"  # bounded label values
            seconds = time.perf_counter() - start
            self.state.metrics.requests.labels(path, str(status[0]), domain).inc()
            self.state.metrics.latency.labels(path, str(status[0]), domain).observe(seconds)
            access_log.info("request", extra={"method": scope["method"], "path": scope["path"], "route": path,
                                              "status": status[0], "domain": domain,
                                              "duration_ms": round(seconds * 1000, 2)})
            request_id.reset(token)

    async def _app_answering_500(self, scope, receive, send) -> None:
        """The app; an unexpected error becomes a 500 in OpenAI's shape here, and goes no further: past this
        point Starlette would answer the same 500 but re-raise, and uvicorn then resets the keep-alive
        connection, so the client's next request on it fails (seen: ReadError after a 500)."""
        try:
            await self.app(scope, receive, send)
        except Exception:
            if scope["state"].get("response_started"):  # too late for a status: let uvicorn close it
                raise
            await errors.unexpected_error()(scope, receive, send)

    async def _cache_hit(self, scope, context, headers, receive, send) -> bool:
        """Answer a known request from the response cache; False (nothing sent, nothing counted): full path."""
        state = self.state
        known = state.known_requests.get(context.get("request_identity"))
        if known is None:
            return False
        key, kind, model = known
        try:
            state.resolve_domain(model)  # still served (and the model loaded)
        except ApiError:
            return False
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        try:
            principal = state.auth.authenticate(token if scheme.lower() == "bearer" else None)  # as HTTPBearer
        except ApiError:
            return False  # the full path says why
        if not principal.allows("generate"):
            return False
        cached = await state.response_cache.aget(key)
        if cached is None:
            return False
        context["domain"] = model
        if state.limiter is not None:
            try:
                context["extra_headers"].update(await state.limiter.hit_request(principal.name))
            except ApiError as e:
                state.metrics.rejected.labels("rate_limit").inc()
                await e.response()(scope, receive, send)
                return True
        state.metrics.cache.labels("response", "hit").inc()
        context["extra_headers"]["x-cache"] = "hit"
        await Response(_with_id(cached, kind), media_type="application/json")(scope, receive, send)
        return True


class BodyTooLarge(Exception):
    """The request body is over `http.max_body_bytes` (raised before the app has seen the request)."""


async def _buffered(receive, limit: int):
    """The whole request body (None if the client left before sending it) and a `receive` that
    replays what was read before passing on the client's own messages. BodyTooLarge past `limit` bytes."""
    chunks, more, size = [], True, 0
    while more:
        message = await receive()
        if message["type"] != "http.request":  # gone mid-body: the app sees the disconnect
            return None, _replay(message, receive)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge
        more = message.get("more_body", False)
    body = b"".join(chunks)
    return body, _replay({"type": "http.request", "body": body, "more_body": False}, receive)


def _replay(first: dict, receive):
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed
