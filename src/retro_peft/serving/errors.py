"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the right status."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from retro_peft.serving.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> bytes:
        """An `ErrorResponse`, as JSON."""
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump_json().encode()

    def response(self) -> Response:
        return Response(self.body(), self.status, self.headers, media_type="application/json")


class RateLimited(ApiError):
    """429: the key is over one of its limits (`headers`: Retry-After and the limit's state)."""

    def __init__(self, message: str, headers: dict[str, str]):
        super().__init__(429, message, "rate_limit_error", "rate_limit_exceeded", headers=headers)


def busy(message: str, retry_after: int, code: str = "overloaded") -> ApiError:
    return ApiError(503, message, "server_error", code, headers={"Retry-After": str(retry_after)})


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error"}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # OpenAI answers 400 (not FastAPI's 422) for a malformed body; name the first bad field.
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(_describe(e) for e in errors[:5]) or "invalid request"
        return ApiError(400, message, param=".".join(loc) or None, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return ApiError(exc.status_code, message, _TYPES.get(exc.status_code, "server_error"),
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return unexpected_error()


def unexpected_error() -> Response:
    """Log the exception being handled; the 500 in OpenAI's shape."""
    log.exception("unexpected error")
    return ApiError(500, "internal server error", "server_error", "internal_error").response()


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    return f"{loc}: {error.get('msg', 'invalid')}" if loc else str(error.get("msg", "invalid"))
