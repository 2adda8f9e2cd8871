"""/v1/retrieve: a domain's passages for a query, without generating (retro-peft's own endpoint)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from retro_peft.domains.registry import AUTO
from retro_peft.errors import RetroPeftError
from retro_peft.serving import payloads
from retro_peft.serving.cache import cache_key
from retro_peft.serving.dependencies import State, authorized
from retro_peft.serving.errors import ApiError
from retro_peft.serving.openapi import errors
from retro_peft.serving.schemas import RetrieveRequest, RetrieveResponse
from retro_peft.serving.state import BASE

router = APIRouter(tags=["retrieval"])


@router.post("/v1/retrieve", response_model=RetrieveResponse, responses=errors(400, 401, 403, 404, 413, 429, 503),
             dependencies=[Depends(authorized("retrieve"))])
async def retrieve(body: RetrieveRequest, request: Request, state: State) -> Response:
    request.state.domain = body.model
    model = state.resolve_domain(body.model)
    if body.k > state.settings.http.max_k:
        raise ApiError(400, f"k is at most {state.settings.http.max_k}", param="k", code="invalid_value")
    if not body.query.strip():  # as an empty prompt: refused before routing or searching
        raise ApiError(400, "the query is empty", param="query", code="invalid_value")
    domain = await state.route(body.query) if model == AUTO else model
    if domain is None:  # no domain fits the question
        return payloads.json_response(payloads.retrieval(BASE, []))
    key = None
    if state.retrieval_cache is not None:
        key = cache_key("retrieve", [domain, state.bank.domains[domain].index_version, body.query, body.k, body.mode,
                                     body.filters])
        cached = await state.retrieval_cache.aget(key)
        state.metrics.cache.labels("retrieval", "hit" if cached is not None else "miss").inc()
        if cached is not None:
            request.state.extra_headers["x-cache"] = "hit"
            return payloads.json_response(cached)
    index = state.bank.domains[domain].index
    try:
        hits = await run_in_threadpool(index.search, body.query, k=body.k, mode=body.mode, filters=body.filters)
    except RetroPeftError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    encoded = payloads.retrieval(domain, hits)
    if key is not None:
        await state.retrieval_cache.aset(key, encoded)
    return payloads.json_response(encoded)
