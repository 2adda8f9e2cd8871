"""What the routes depend on: the app's `ServerState` and an authorized caller.

`authorize` is the one check of a caller, used by the `authorized` dependency and by the
response cache's fast path in the middleware (`RequestContext._cache_hit`), so both refuse
for the same reasons and count against the same limits.
"""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from retro_peft.serving.auth import Principal, forbidden
from retro_peft.serving.errors import RateLimited
from retro_peft.serving.state import ServerState

bearer = HTTPBearer(auto_error=False, description="an API key or a JWT")


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


async def authorize(state: ServerState, token: str | None, scope: str | None,
                    extra_headers: dict[str, str]) -> Principal:
    """The caller behind the bearer `token`, checked for `scope` (None: any valid credential) and counted
    against its request limit, whose headers go into `extra_headers`.
    Raises ApiError: 401 (authentication), 403 (scope) or RateLimited (429)."""
    principal = state.auth.authenticate(token)
    if scope is not None and not principal.allows(scope):
        raise forbidden(scope)
    if state.limiter is not None:
        try:
            extra_headers.update(await state.limiter.hit_request(principal.name))
        except RateLimited:
            state.metrics.rejected.labels("rate_limit").inc()
            raise
    return principal


@functools.cache
def authorized(scope: str | None):
    """The dependency giving the caller, authorized for `scope` (one per scope)."""

    async def dependency(request: Request, state: State,
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Principal:
        token = credentials.credentials if credentials else None
        return await authorize(state, token, scope, request.state.extra_headers)

    return dependency
