"""GET /: the playground, a page for trying the domains in a browser (static files in `serving/static/`).

The page is the server's own API seen from a browser: it lists the domains (GET /v1/models), streams an
answer (POST /v1/chat/completions with `stream: true`) and reads the cited passages' text (POST
/v1/retrieve), with the API key a person types into it as the bearer token. The files themselves hold no
data, so they are served without a key; their Content-Security-Policy lets the page load and call nothing
but this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from retro_peft.serving.errors import ApiError

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}  # what the page loads besides itself
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new version of the server serves its own page at once
}

router = APIRouter(include_in_schema=False)  # a page, not an API: not in the OpenAPI schema


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL reaches the file system
        raise ApiError(404, f"no playground file {name!r}", "not_found_error", "not_found")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=_HEADERS)
