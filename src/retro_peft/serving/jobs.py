"""Generation jobs on the `MicroBatcher`, from the event loop: queued, awaited (and cancelled when the client
goes away), their failures as OpenAI errors and their tokens counted."""

from __future__ import annotations

import asyncio

from fastapi import Request

from retro_peft.errors import RetroPeftError
from retro_peft.generation import Answer, SamplingConfig, SearchOptions
from retro_peft.generation.grammar import JsonConstraint
from retro_peft.generation.prompt import Turn
from retro_peft.serving.batcher import Job, QueueFull, RequestTimeout
from retro_peft.serving.errors import ApiError, busy
from retro_peft.serving.state import BASE, ServerState


def submit(state: ServerState, question: str, domain: str | None, sampling: SamplingConfig,
           search: SearchOptions | None, on_text=None, choices: tuple[str, ...] | None = None,
           history: tuple[Turn, ...] = (), constraint: JsonConstraint | None = None) -> Job:
    """Queue one answer (`on_text`: called with each piece of text, from the batcher's thread; `history`: the
    conversation's earlier turns; `constraint`: the JSON it answers in); 503 when full."""
    try:
        return state.batcher.submit(question, domain, sampling, on_text, search, choices, history, constraint)
    except QueueFull as e:
        state.metrics.rejected.labels("queue_full").inc()
        raise busy(str(e), e.retry_after) from None


def submit_all(state: ServerState, questions: list[str], domains: list[str | None], sampling: SamplingConfig,
               search: SearchOptions | None, choices: tuple[str, ...] | None = None,
               history: tuple[Turn, ...] = (), constraint: JsonConstraint | None = None) -> list[Job]:
    """All the jobs or none (those queued are cancelled when one does not fit)."""
    jobs = []
    try:
        for q, d in zip(questions, domains):
            jobs.append(submit(state, q, d, sampling, search, choices=choices, history=history, constraint=constraint))
    except ApiError:
        for job in jobs:
            state.batcher.cancel(job)
        raise
    return jobs


async def wait_all(state: ServerState, request: Request, jobs: list[Job]) -> list[Answer] | None:
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
        raise generation_error(e) from None
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


def generation_error(e: RetroPeftError) -> ApiError:
    from retro_peft.domains.bank import DomainError  # torch, transformers, peft: loaded with the bank anyway

    if isinstance(e, DomainError):
        return busy(f"domain unavailable: {e}", 30, "domain_unavailable")
    return ApiError(400, str(e), code="invalid_value")


def count_tokens(state: ServerState, answers: list[Answer], domains: list[str | None]) -> None:
    for a, d in zip(answers, domains):
        state.metrics.prompt_tokens.labels(d or BASE).inc(a.prompt_tokens)
        state.metrics.generated_tokens.labels(d or BASE).inc(a.completion_tokens)
