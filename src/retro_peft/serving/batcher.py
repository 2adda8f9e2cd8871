"""Dynamic micro-batching over `AdapterBank.answer_many`.

Requests wait in a bounded queue. One worker thread owns the model: it takes
the oldest request, waits for more, and decodes them in one pass, whatever
their domains.

The wait ends as soon as as many requests are queued as were in flight at the
busiest moment of the last pass (before the first pass: `max_batch_size`), so
a lone client is not kept waiting, and N clients that each send their next
request when answered are decoded together again instead of splitting into two
alternating passes of N/2 (measured before this rule: mean batch 16.0 at 32
clients on the GPU). It counts from when both the request and the worker are
free, so the clients answered by the last pass have time to come back, and it
lasts at most `max_wait_ms` or a tenth of a mean pass, whichever is longer:
waiting 1.5 s to fill a 15 s CPU pass is cheap, and a fixed 50 ms was too short
for 32 clients to come back on a busy 2-core machine (mean batch 21.3 of 32).

Rows of one pass share a `SamplingConfig` and `SearchOptions` (the bank takes
one of each per call), so a batch holds the oldest request and the queued
requests with the same settings; the others wait for the next pass, in order.
Answer choices (`guided_choice`), JSON constraints (`response_format`) and a chat's earlier turns
are per row: requests with different choices, formats or conversations share a pass.

The event loop never blocks: it submits a `Job` and awaits its future; the
worker streams text back with `call_soon_threadsafe`. A job whose client went
away, or whose time ran out, is flagged `cancelled`; the bank polls that flag
every decode step, so the row stops generating at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable

from retro_peft import tracing
from retro_peft.errors import RetroPeftError
from retro_peft.generation import Answer, SamplingConfig, SearchOptions
from retro_peft.generation.grammar import JsonConstraint
from retro_peft.generation.prompt import Turn
from retro_peft.serving.settings import BatchingConfig

log = logging.getLogger(__name__)


WAIT_FRACTION_OF_PASS = 0.1  # a pass may wait this fraction of the mean pass time for its requests


class QueueFull(Exception):
    """The queue is at its bound: answer 503 with Retry-After."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: retry in {retry_after} s")
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """The request waited and ran longer than `request_timeout_s`."""

    def __init__(self, retry_after: int):
        super().__init__("the request timed out: the server is overloaded, retry later")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    question: str
    domain: str | None
    sampling: SamplingConfig
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_text: Callable[[str], None] | None = None  # runs on the event loop
    search: SearchOptions | None = None  # retrieval options in place of the domain's own
    choices: tuple[str, ...] | None = None  # the answer is one of these (None: the domain's choices, if any)
    history: tuple[Turn, ...] = ()  # a chat's earlier turns, oldest first (system messages included)
    constraint: JsonConstraint | None = None  # the answer is this JSON (`response_format`), decoded under its grammar
    cancelled: bool = False  # set by the event loop, read by the worker: a plain bool is enough
    enqueued: float = field(default_factory=time.monotonic)


class JobQueue:
    """The event-loop side every batching mode shares: a bounded queue of `Job`s, submit / wait with the request
    timeout / cancel / stop, and the queue-depth gauge. A subclass owns the worker thread (`_work`) and says when
    to retry (`retry_after`); `_busy` counts the jobs it has taken and not answered yet."""

    thread_name = "retro-peft-batcher"

    def __init__(self, bank, config: BatchingConfig, metrics=None):
        self.bank = bank
        self.config = config
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._thread: threading.Thread | None = None

    # -- event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=self.thread_name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + self._busy

    def retry_after(self) -> int:
        raise NotImplementedError

    def submit(self, question: str, domain: str | None, sampling: SamplingConfig,
               on_text: Callable[[str], None] | None = None,
               search: SearchOptions | None = None, choices: tuple[str, ...] | None = None,
               history: tuple[Turn, ...] = (), constraint: JsonConstraint | None = None) -> Job:
        """Queue one request (raises QueueFull); await `wait(job)` for its answer. Call on the event loop."""
        loop = asyncio.get_running_loop()
        job = Job(question, domain, sampling, loop, loop.create_future(), on_text, search, choices, history,
                  constraint)
        with self._cond:
            if self._stopping or len(self._queue) >= self.config.max_queue:
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._queued()
            self._set_depth()
            self._cond.notify()
        return job

    def _queued(self) -> None:
        """Called under the lock after a job joined the queue."""

    async def wait(self, job: Job) -> Answer:
        """The job's answer (RequestTimeout past the timeout); cancelling this stops the row's generation."""
        remaining = job.enqueued + self.config.request_timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.cancel(job)
            raise RequestTimeout(self.retry_after()) from None
        except asyncio.CancelledError:  # the client disconnected
            self.cancel(job)
            raise

    def cancel(self, job: Job) -> None:
        """Stop a job: out of the queue if it still waits (its slot is free at once), else the worker drops its row
        (it polls the flag every decode step)."""
        job.cancelled = True
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # already taken by the worker
            self._set_depth()
            self._cond.notify()
        job.future.cancel()

    async def generate(self, question: str, domain: str | None, sampling: SamplingConfig,
                       on_text: Callable[[str], None] | None = None,
                       search: SearchOptions | None = None, choices: tuple[str, ...] | None = None,
                       history: tuple[Turn, ...] = ()) -> Answer:
        return await self.wait(self.submit(question, domain, sampling, on_text, search, choices, history))

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the ones queued and in flight (graceful shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _work(self) -> None:
        raise NotImplementedError


class MicroBatcher(JobQueue):
    """Passes run to completion (`batching.mode: passes`; see the module docstring)."""

    def __init__(self, bank, config: BatchingConfig, metrics=None):
        super().__init__(bank, config, metrics)
        self._batch_seconds = 0.5  # running mean of a pass: Retry-After and the wait
        self._free_since = 0.0  # when the last pass ended
        self._peak = 0  # most requests in flight at once since the last batch was taken
        self._expected = config.max_batch_size  # that peak for the last pass: the batch to wait for

    def retry_after(self) -> int:
        passes = math.ceil((len(self._queue) + 1) / self.config.max_batch_size)
        return max(1, math.ceil(passes * self._batch_seconds))

    def _queued(self) -> None:
        self._peak = max(self._peak, self.in_flight)

    # -- worker side ----------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        max_size = self.config.max_batch_size
        max_wait = max(self.config.max_wait_ms / 1000, WAIT_FRACTION_OF_PASS * self._batch_seconds)
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue[0]
            while not self._stopping:
                same = sum(1 for j in self._queue if pass_key(j) == pass_key(first))
                remaining = max(first.enqueued, self._free_since) + max_wait - time.monotonic()
                if same >= min(max_size, self._expected) or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [j for j in self._queue if pass_key(j) == pass_key(first)][:max_size]
            taken = set(map(id, batch))
            self._queue = deque(j for j in self._queue if id(j) not in taken)
            self._busy = len(batch)
            self._expected, self._peak = max(self._peak, 1), self.in_flight
            self._set_depth()
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = []
            for job in batch:
                if job.cancelled:  # gone while it waited: nothing to generate
                    resolve(job)
                else:
                    live.append(job)
            if live:
                start = time.perf_counter()
                self._run(live)
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - start)
                if self.metrics is not None:
                    self.metrics.batch_size.observe(len(live))
            self._busy = 0
            self._free_since = time.monotonic()

    def _run(self, jobs: list[Job]) -> None:
        def answer(jobs: list[Job]) -> list[Answer]:
            # one trace per pass: its requests share the retrieve, prefill and decode spans
            with tracing.span("batch", requests=len(jobs), domains=sorted({str(j.domain) for j in jobs})):
                return self.bank.answer_many([j.question for j in jobs], [j.domain for j in jobs],
                                             sampling=jobs[0].sampling, search=jobs[0].search,
                                             on_text=stream_to(jobs), cancelled=lambda row: jobs[row].cancelled,
                                             choices=[j.choices for j in jobs], history=[j.history for j in jobs],
                                             constraints=[j.constraint for j in jobs])

        answer_each(jobs, answer, resolve)


def pass_key(job: Job):
    """Rows decoded together share these (the bank takes one sampling config and one search per call; choices
    and history are per row)."""
    return job.sampling, job.search


def stream_to(jobs: list[Job]) -> Callable:
    """A pass's on_text(row, delta, logprobs): row i's text to jobs[i]'s stream, on its event loop."""
    def on_text(row: int, delta: str, logprobs: list | None = None) -> None:
        job = jobs[row]
        if job.on_text is not None and not job.cancelled:
            job.loop.call_soon_threadsafe(job.on_text, delta, logprobs)

    return on_text


def answer_each(items: list, answer: Callable[[list], list], settle: Callable) -> None:
    """settle(item, result=...) with answer(items)'s answers; if that raises, answer each item alone, so that one
    bad request fails only itself: settle(item, exception=...) (an error that is not a RetroPeftError is logged)."""
    try:
        answers = answer(items)
    except Exception as e:  # noqa: BLE001 - one bad request must not fail the others in its pass
        if len(items) > 1:
            for item in items:
                answer_each([item], answer, settle)
            return
        if not isinstance(e, RetroPeftError):
            log.exception("generation failed")
        settle(items[0], exception=e)
        return
    for item, result in zip(items, answers):
        settle(item, result=result)


def resolve(job: Job, result=None, exception: BaseException | None = None) -> None:
    """Settle a job's future on its event loop (from the worker thread); a cancelled job's is cancelled."""
    def settle():
        if job.future.done():
            return
        if job.cancelled:  # nobody waits for it any more
            job.future.cancel()
        elif exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed (shutdown): nobody is waiting
        pass
