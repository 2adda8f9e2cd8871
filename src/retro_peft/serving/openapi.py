"""What the OpenAPI schema says besides the routes' own models: the errors each route answers (all in
OpenAI's shape, `ErrorResponse`), the server-sent events of `stream: true`, and no 422.

tests/test_serve_fuzz.py checks with schemathesis that every response, each streamed event included,
matches what is documented here.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.constants import REF_PREFIX, REF_TEMPLATE
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from retro_peft.serving.schemas import ChatChunk, CompletionChunk, ErrorResponse

_ERRORS = {
    400: "invalid request: a malformed body, a value out of this server's bounds, an empty prompt",
    401: "missing, invalid or expired credentials",
    403: "the API key or token lacks the scope",
    404: "no such model: name a domain of GET /v1/models, or `auto`",
    413: "the body is larger than `http.max_body_bytes`",
    429: "a rate limit is reached (Retry-After)",
    500: "an internal error",
    503: "the model is loading or failed to load, the queue is full, the request timed out or its domain is "
         "unavailable (Retry-After)",
}
_CHUNKS = (CompletionChunk, ChatChunk)


def errors(*statuses: int) -> dict[int, dict]:
    """The `responses=` of a route that answers these error statuses, and 500 (any route can fail)."""
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in sorted({*statuses, 500})}


def streamed(chunk: type[CompletionChunk | ChatChunk]) -> dict:
    """The 200 of a route that streams with `stream: true`: besides its JSON, server-sent events.

    The events are described one by one as OpenAPI 3.2's `itemSchema` does (FastAPI writes the same for its
    own event streams, and schemathesis checks each event against it): each `data` is a `chunk` as JSON, or
    an `ErrorResponse` when generation fails after the 200 went out, and the last is `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}
    return {"content": {"text/event-stream": {"itemSchema": event}},
            "description": "JSON, or with `stream: true` server-sent events ending with `data: [DONE]`"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"{REF_PREFIX}{model.__name__}"}


def install(app: FastAPI) -> None:
    """Complete FastAPI's schema (built once, at the first /openapi.json) with what routes cannot declare."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()  # cached in app.openapi_schema: edited there, once
            _without_validation_422(schema)
            _with_chunk_models(schema)
        return app.openapi_schema

    app.openapi = openapi


def _without_validation_422(schema: dict) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers an invalid request with a 400
    in OpenAI's shape instead (errors.install), as OpenAI does."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)


def _with_chunk_models(schema: dict) -> None:
    """The chunk models `streamed` refers to: only event streams use them, so FastAPI did not list them."""
    _, definitions = models_json_schema([(m, "serialization") for m in _CHUNKS], ref_template=REF_TEMPLATE)
    for name, definition in definitions["$defs"].items():
        schema["components"]["schemas"].setdefault(name, definition)  # shared ones (Usage, Citation) are there
