"""`stream: true`: one answer as server-sent events (`payloads.Chunks`), piece by piece as the batcher
decodes it, ending with `data: [DONE]`."""

from __future__ import annotations

import asyncio

from fastapi.responses import StreamingResponse

from retro_peft.errors import RetroPeftError
from retro_peft.generation import SamplingConfig, SearchOptions
from retro_peft.generation.prompt import Turn
from retro_peft.serving import jobs
from retro_peft.serving.batcher import RequestTimeout
from retro_peft.serving.errors import busy
from retro_peft.serving.payloads import DONE, Chunks, event
from retro_peft.serving.state import ServerState

# Each event goes out as it comes: not cached, not buffered by a proxy (nginx reads X-Accel-Buffering).
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def stream(state: ServerState, question: str, domain: str | None, model: str, sampling: SamplingConfig,
           search: SearchOptions | None, chat: bool, usage_chunk: bool,
           choices: tuple[str, ...] | None = None, history: tuple[Turn, ...] = (),
           constraint=None) -> StreamingResponse:
    """The job is queued before the 200 goes out, so a full queue is still a 503. `model`: the one reported."""
    pieces: asyncio.Queue[tuple[str, list | None]] = asyncio.Queue()  # (text, its tokens' logprobs or None)
    job = jobs.submit(state, question, domain, sampling, search, lambda text, logprobs=None:
                      pieces.put_nowait((text, logprobs)), choices, history, constraint)
    chunks = Chunks(model, chat, state.bank.tokenizer)

    async def events():
        waiter = asyncio.ensure_future(state.batcher.wait(job))
        try:
            for opening in chunks.opening():
                yield opening
            while True:
                getter = asyncio.ensure_future(pieces.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield chunks.piece(*getter.result())
                    continue
                getter.cancel()
                break
            while not pieces.empty():
                yield chunks.piece(*pieces.get_nowait())
            try:
                answer = waiter.result()
            except (RequestTimeout, RetroPeftError) as e:  # too late for a status: the error is an event
                error = busy(str(e), 1, "timeout") if isinstance(e, RequestTimeout) else jobs.generation_error(e)
                yield event(error.body())
                yield DONE
                return
            jobs.count_tokens(state, [answer], [domain])
            for last in chunks.last(answer, usage_chunk):
                yield last
        finally:  # the client disconnected (the response was cancelled) or we are done
            if not waiter.done():
                job.cancelled = True
                waiter.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=_HEADERS)
