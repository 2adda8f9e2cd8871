"""Continuous batching (`batching.mode: continuous`): requests join and leave one running decode batch.

The same interface as `MicroBatcher` (submit / wait / cancel / stop / depth / in_flight, the
same `Job`, `QueueFull` and `RequestTimeout`), a different worker. Its one thread repeats:
1. take queued jobs while the batch has room (`max_batch_size` rows running or prepared)
   and prepare their rows (retrieval, prompt);
2. rows the engine does not decode (answer choices, JSON constraints, answerability heads,
   logprobs, non-LoRA adapters: see `ContinuousBatch.decodes`) run at once through the
   bank's pass path, as `MicroBatcher` would run them; the running rows wait for that pass;
3. admit prepared rows into the running batch (`ContinuousBatch.admit`): all of them into
   an idle batch; beside running rows at most `PREFILL_TOKENS` prompt tokens per step, and a
   longer prompt alone, prefilled `PREFILL_TOKENS` at a time between steps (chunked prefill),
   so no prefill stalls the running rows for more than one chunk;
   a row whose adapter would evict one a running row decodes with waits for a slot;
4. one decode step for every running row; finished, stopped and cancelled rows are answered.

A client that goes away (or whose time runs out) flags its job `cancelled`: its row leaves at
the next step. Sampling settings and retrieval options are per row, so unlike a pass, any
requests share the batch. With `compile_decode` (CUDA) the running batch sits in the slots of a
static cache and every step replays a CUDA graph (`ContinuousBatch` with the bank's `StaticDecode`),
from this one thread, which owns every replay.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

from retro_peft.generation.continuous import ContinuousBatch, Request
from retro_peft.generation.prompt import check_fits, model_context
from retro_peft.serving.batcher import Job, JobQueue, answer_each, pass_key, resolve, stream_to
from retro_peft.serving.settings import BatchingConfig

log = logging.getLogger(__name__)

PREFILL_TOKENS = 512  # prompt tokens prefilled between two decode steps while other rows are running


class ContinuousScheduler(JobQueue):
    """Requests join and leave one running decode batch (`batching.mode: continuous`; the module docstring)."""

    thread_name = "retro-peft-scheduler"

    def __init__(self, bank, config: BatchingConfig, metrics=None):
        super().__init__(bank, config, metrics)
        self._engine = ContinuousBatch(bank.runner, bank.adapters_for, static=bank.runner.static)
        self._ready: list[tuple[Job, Request]] = []  # prepared, waiting to be admitted
        self._jobs: dict[int, tuple[Job, float]] = {}  # id(request) -> (its job, when admitted), the rows running
        self.finished = Counter()  # answers by finish reason ("stop", "length", "cancelled": the client went away)
        self._request_seconds = 1.0  # running mean of a request's time from admission to answer: Retry-After

    def retry_after(self) -> int:
        waves = math.ceil((len(self._queue) + 1) / self.config.max_batch_size)
        return max(1, math.ceil(waves * self._request_seconds))

    # -- worker side ----------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        """Queued jobs that fit beside the rows running and prepared (None: stopped and drained)."""
        with self._cond:
            while not self._queue and not self._ready and not self._engine.running and not self._engine.prefilling:
                if self._stopping:
                    return None
                self._cond.wait()
            room = self.config.max_batch_size - self._engine.running - len(self._ready)
            taken = [self._queue.popleft() for _ in range(min(max(room, 0), len(self._queue)))]
            self._busy += len(taken)
            self._set_depth()
            return taken

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            try:
                self._prepare(taken)
                self._admit()
                self._answer(self._engine.step())
                if self.metrics is not None and self._engine.running:
                    self.metrics.batch_size.observe(self._engine.running)
            except Exception as e:  # noqa: BLE001 - a failed forward fails the rows in it, never the worker
                log.exception("continuous decoding failed")
                for job, _ in self._jobs.values():
                    self._resolve(job, exception=e)
                self._jobs.clear()
                self._engine = ContinuousBatch(self.bank.runner, self.bank.adapters_for,
                                               static=self.bank.runner.static)

    def _prepare(self, jobs: list[Job]) -> None:
        """Rows for the jobs taken: the engine's wait in `_ready`, the others run a pass now."""
        passes: list[tuple[Job, object]] = []
        for job in jobs:
            if job.cancelled:
                self._resolve(job)
                continue
            try:
                row = self.bank.rows([job.question], [job.domain], search=job.search, choices=[job.choices],
                                     history=[job.history], constraints=[job.constraint])[0]
                check_fits([row.prompt], job.sampling.max_new_tokens, model_context(self.bank.runner.model))
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._resolve(job, exception=e)
                continue
            adapter = self.bank.adapter_of(job.domain)
            method = None if adapter is None else self.bank.domains[job.domain].method
            if ContinuousBatch.decodes(row, job.sampling) and method in (None, "lora"):
                self._ready.append((job, self._request(job, row, adapter)))
            else:
                passes.append((job, row))
        for group in _groups(passes):
            self._run_pass(group)

    def _request(self, job: Job, row, adapter) -> Request:
        def on_text(delta: str) -> None:
            if job.on_text is not None and not job.cancelled:
                job.loop.call_soon_threadsafe(job.on_text, delta, None)

        return Request(row, job.sampling, on_text if job.on_text is not None else None, lambda: job.cancelled, adapter)

    def _run_pass(self, group: list[tuple[Job, object]]) -> None:
        needed = {self.bank.adapter_of(j.domain) for j, _ in group} - {None}
        if len((self._engine.tags - {None}) | needed) > self.bank.max_adapters:
            while self._engine.running:  # it would evict a running row's adapter: after them
                self._answer(self._engine.step())

        def answer(group: list[tuple[Job, object]]) -> list:
            jobs = [j for j, _ in group]
            self.bank.keep_resident(self._engine.tags - {None})  # most recently used: the pass's evict others first
            return self.bank.run_rows([r for _, r in group], [j.domain for j in jobs], jobs[0].sampling,
                                      on_text=stream_to(jobs), cancelled=lambda i: jobs[i].cancelled)

        answer_each(group, answer, lambda pair, **outcome: self._resolve(pair[0], **outcome))

    def _admit(self) -> None:
        """Move prepared rows into the running batch (see the module's docstring for how many)."""
        if self._engine.prefilling:  # a long prompt's next chunk; the others wait until it has joined
            self._answer(self._engine.prefill_chunk(PREFILL_TOKENS))
            return
        idle = not self._engine.running
        in_use = self._engine.tags - {None}
        budget, chosen, passes = PREFILL_TOKENS, [], []
        for job, request in list(self._ready):
            if job.cancelled:
                self._ready.remove((job, request))
                self._resolve(job)
                continue
            tokens = len(request.row.tail_ids if request.row.stored else request.row.prompt.input_ids)
            if not idle and chosen and tokens > budget:
                break
            if request.tag is not None:
                try:
                    if not self.bank.bring_in(request.tag, in_use):
                        continue  # its adapter would evict one a running row uses: it waits for a slot
                except Exception as e:  # noqa: BLE001 - a broken adapter fails its own request
                    self._ready.remove((job, request))
                    self._resolve(job, exception=e)
                    continue
                if not self.bank.mixes(request.tag):
                    self._ready.remove((job, request))
                    passes.append((job, request.row))
                    continue
                in_use.add(request.tag)
            self._ready.remove((job, request))
            chosen.append((job, request))
            budget -= tokens
            if not idle and budget <= 0:
                break
        for group in _groups(passes):
            self._run_pass(group)
        if chosen:
            now = time.monotonic()
            for job, request in chosen:
                self._jobs[id(request)] = (job, now)
            # beside running rows a prompt longer than the budget is prefilled a budget at a time
            self._answer(self._engine.admit([r for _, r in chosen], chunk_tokens=None if idle else PREFILL_TOKENS))

    def _answer(self, finished) -> None:
        for done in finished:
            job, admitted = self._jobs.pop(id(done.request))
            self.finished[done.answer.finish_reason] += 1
            self._request_seconds = 0.9 * self._request_seconds + 0.1 * (time.monotonic() - admitted)
            self._resolve(job, result=done.answer)

    def _resolve(self, job: Job, result=None, exception: BaseException | None = None) -> None:
        with self._cond:
            self._busy = max(self._busy - 1, 0)

        resolve(job, result, exception)


def _groups(pairs: list[tuple[Job, object]]) -> list[list[tuple[Job, object]]]:
    """Pass-path jobs by (sampling, search): the bank's runner takes one of each per pass."""
    groups: dict = {}
    for job, row in pairs:
        groups.setdefault(pass_key(job), []).append((job, row))
    return list(groups.values())
