"""Request and response ids: unique, not secret."""

from __future__ import annotations

import itertools
import uuid

# A random prefix per process and a counter: a uuid4 per request cost 5% of a cached request.
_PREFIX, _COUNTER = uuid.uuid4().hex[:16], itertools.count()


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):08x}"


def new_response_id(chat: bool) -> str:
    """OpenAI's form: `chatcmpl-...` for chat completions, `cmpl-...` for completions."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{new_request_id()}"
