"""The decode loop: a left-padded batch prefilled once, then one forward per new token for the whole batch.

`decode_steps` is a small explicit loop over the KV cache, kept explicit on purpose: a
frozen KV cache's stored states replace part of the prefill (`past`), and `StaticDecode`
replaces the decode step (a preallocated cache and, on CUDA, one CUDA-graph replay per
token). `generate_batch` adds what a request needs around it: stop strings, streaming
text as it grows, cancellation.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
import transformers

from retro_peft import tracing
from retro_peft.errors import InputError
from retro_peft.generation.sampling import SamplingConfig, choose_tokens
from retro_peft.hf_compat import (DECODE_ATTENTION, TRANSFORMERS_MAJOR, StackedStates, as_cache, cache_kwarg,
                                  dynamic_cache, fused_siblings, refill_static, short_query_attention, sibling_groups,
                                  static_cache)
from retro_peft.base_model import model_dtype, to_device

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.add(im_end)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return ids


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    both = to_device(torch.stack([input_ids, attention_mask]), device)  # one copy, queued (not waited for)
    return both[0], both[1]


class GraphFailed(RuntimeError):
    """A compiled step failed to compile or capture; the decode continues eagerly (see `decode_steps`)."""


SYNC_EVERY = 8  # static decoding reads which rows finished back to the host once per this many tokens


class StaticDecode:
    """Prefill and decode steps with fixed shapes, so that they run as CUDA graphs.

    Eager decoding on a GPU is bound by launching kernels, not by arithmetic (a
    Llama-1B step issues hundreds of small kernels). Here the KV cache is a
    `StaticCache` (context + prompt + max_new_tokens slots, rounded up to a multiple
    of `LENGTH_STEP`, written in place; a frozen KV cache's assembled context is
    copied into its first slots) and the attention mask has its final length from
    the start (causal masking hides the slots not written yet), so every step has
    the same shapes and `torch.compile(mode="reduce-overhead")` replays it as a CUDA
    graph, the greedy token chosen inside it. Three more things keep the GPU busy:
    - caches are kept per shape and reused (`MAX_CACHES`, least recently used
      dropped): a graph replays over the same addresses instead of being recorded
      again for a new cache;
    - a prompt of at most `PREFILL_BUCKETS[-1]` tokens (the question after a frozen
      KV cache's context) is left-padded to a bucket and prefilled by a graph too;
      a longer one is compute-bound and prefilled eagerly;
    - the host learns which rows finished once per `sync_every` tokens, not per
      token, and reads it one step late, after queueing the next step, so the
      GPU never waits for the host (a row that stops runs on for at most
      `sync_every` steps; their tokens are dropped);
    - a step's one-token queries and a prefill graph's short prompt attend through `decode_attention`
      (`hf_compat.short_query_attention`): "grouped" (the default) groups the query heads by key/value head
      instead of attending over a copy of the cache repeated for each query head; "flex" runs PyTorch's
      flex_attention (its flash-decoding kernel; the 4D mask built outside the graph, `attention_mask`); None
      keeps sdpa as transformers traces it;
    - with `fused_projections` (off by default), each layer's q/k/v projections and its MLP's gate and up
      projections run as one matmul each (`hf_compat.fused_siblings`: their weights concatenated once, each
      layer's own weight a view of its rows, so no memory is added). Measured on an H100 (8B shape, batch 1;
      BENCHMARKS.md): 135.7 against 135.4 tokens/s, and a first token through the frozen cache in 20.5
      against 17.8 ms, so it stays off until it shows a gain (the H200, where the small k/v products alone
      read at a third of the bandwidth, is not measured yet).
    The first call per shape compiles (tens of seconds); later calls replay. A
    failure to compile or capture falls back to the eager path with one logged
    warning. `compile=False` runs the same static path eagerly (any device): the
    tests check it against the ordinary path. Use a compiled one from one thread:
    torch keeps CUDA-graph state per thread (another thread's replay fails an
    assertion in `torch._inductor.cudagraph_trees`, which falls back here).
    """

    LENGTH_STEP = 64  # cache lengths are rounded up to a multiple of this, so nearby prompt lengths share a graph
    PREFILL_BUCKETS = (16, 32, 64, 128)  # prompt lengths prefilled by a graph (one per bucket and cache length)
    # Batch sizes a batch is padded up to (larger ones: a multiple of the last). Each new shape costs a compile
    # (tens of seconds) while a decode step up to batch 32 is bound by reading the weights, so a few padded rows
    # cost little: a server's batches of 1-32 rows replay three graphs instead of recording thirty-two.
    BATCH_BUCKETS = (1, 8, 32)
    MAX_CACHES = 8  # static caches kept for reuse (one per batch bucket and length)
    # torch.compile records one graph per shape; its default limit (8 per function) would send the rest eager
    RECOMPILE_LIMIT = 64

    def __init__(self, model, compile: bool = True, sync_every: int = SYNC_EVERY,
                 decode_attention: str | None = "grouped", fused_projections: bool = False,
                 compile_options: dict | None = None):
        self.model = model
        device = next(model.parameters()).device
        if compile and device.type != "cuda":
            raise InputError(f"compiled decoding replays CUDA graphs: it needs a CUDA device, the model is on {device}")
        if sync_every < 1:
            raise InputError(f"sync_every must be at least 1, got {sync_every}")
        # Two compiled functions (two code objects, so two caches of graphs): prefills and steps never share a
        # graph, and dynamic=False keeps each shape's graph static instead of recompiling one with symbolic shapes
        # when a second shape appears (slower kernels, and minutes of compiling for an 8B model).
        if decode_attention is not None and decode_attention not in DECODE_ATTENTION:
            raise InputError(f"unknown decode_attention {decode_attention!r}; known: None, "
                             f"{', '.join(DECODE_ATTENTION)}")
        self.decode_attention = decode_attention
        self.siblings = sibling_groups(model) if fused_projections else []
        # mode="reduce-overhead" is these options; `compile_options` adds inductor's others (e.g.
        # {"coordinate_descent_tuning": True}, or {"max_autotune": True}: kernels chosen by timing them)
        options = {"triton.cudagraphs": True, **(compile_options or {})}
        self.compiled = {"prefill": torch.compile(self._prefill, options=options, dynamic=False),
                         "step": torch.compile(self._step, options=options, dynamic=False)} if compile else None
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
        self.sync_every = sync_every
        self._caches: OrderedDict = OrderedDict()

    def eager(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last position's logits [batch, vocab], the greedy tokens [batch])."""
        logits = self.model(**inputs).logits[:, -1, :]
        return logits, logits.argmax(dim=-1)

    def _prefill(self, **inputs):
        return self.eager(**inputs)

    def _step(self, **inputs):
        return self.eager(**inputs)

    def forward(self, kind: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`eager`, as a CUDA-graph replay when compiled (kind: "prefill" or "step"). Raises GraphFailed (after one
        warning, and from then on runs eagerly) when compiling or capturing fails. A replay overwrites its
        outputs: use them up first."""
        # (uncompiled too: the CPU tests check the static path's tokens with the attention the graphs replay)
        attention = (short_query_attention(self.model, self.decode_attention) if self.decode_attention
                     else contextlib.nullcontext())
        if self.compiled is None:
            with attention, fused_siblings(self.siblings):
                return self.eager(**inputs)
        try:
            # A new iteration: the previous replay's outputs are dead (used up), so the graphs replay over the
            # same memory instead of recording new ones that keep the old outputs alive.
            torch.compiler.cudagraph_mark_step_begin()
            with attention, fused_siblings(self.siblings):
                return self.compiled[kind](**inputs)
        except Exception as error:  # noqa: BLE001 - any failure of the compiler or the capture: the eager path is right
            self.compiled = None
            log.warning("compiled decoding failed (%s: %s); decoding eagerly from now on",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            raise GraphFailed(str(error)) from error

    def attention_mask(self, mask: torch.Tensor, first_slot: int, tokens: int) -> torch.Tensor:
        """The mask a call takes for `tokens` queries written at static-cache slots `first_slot`...: the
        [batch, slots] padding mask as it is (the model builds the causal one inside the graph), or for "flex"
        attention the [batch, 1, tokens, slots] boolean mask of padding and causality, built here, outside the
        graph: inductor's flex_attention lowering takes a mask that is a graph input and refuses one computed
        inside the graph. (transformers passes a 4D mask through as it is.)"""
        if self.decode_attention != "flex":
            return mask
        slots = torch.arange(mask.shape[1], device=mask.device)
        queries = torch.arange(first_slot, first_slot + tokens, device=mask.device)
        return mask.bool()[:, None, None, :] & (slots[None, :] <= queries[:, None])[None, None]

    def cache_length(self, tokens: int) -> int:
        return -(-tokens // self.LENGTH_STEP) * self.LENGTH_STEP

    def prefill_bucket(self, tokens: int) -> int | None:
        return next((b for b in self.PREFILL_BUCKETS if tokens <= b), None)

    def batch_bucket(self, rows: int) -> int:
        last = self.BATCH_BUCKETS[-1]
        return next((b for b in self.BATCH_BUCKETS if rows <= b), -(-rows // last) * last)

    def cache(self, batch: int, length: int, device, dtype, context=None):
        """A StaticCache of `length` slots, emptied; `context` (a cache of precomputed states) is written into its
        first ones. Reused across calls of the same shape."""
        if context is not None and TRANSFORMERS_MAJOR < 5:
            # 4.x places the prompt at the count of non-zero slots in row 0, which context padding breaks
            raise InputError("static decoding with a frozen KV cache's context needs transformers >= 5, "
                             f"found {transformers.__version__}")
        key = (batch, length, str(device), dtype)
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = static_cache(self.model.config, batch=batch, length=length, device=device, dtype=dtype)
            while len(self._caches) >= self.MAX_CACHES:
                self._caches.popitem(last=False)
        self._caches[key] = cache
        refill_static(cache, context)  # its slots come first: the prompt's tokens are written after them
        return cache

    def syncs_at(self, step: int) -> bool:
        """Whether the host reads the tokens after decode step `step` (the first at once: time to first token)."""
        return step % self.sync_every == 0


def _record(record, sampling, logits, token) -> None:
    if record is not None and sampling.logprobs is not None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(sampling.logprobs, dim=-1) if sampling.logprobs else None
        record.append((logp.gather(-1, token[:, None])[:, 0].cpu(),
                       None if top is None else top.values.cpu(), None if top is None else top.indices.cpu()))


@torch.inference_mode()
def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 stop_ids: set[int], pad_id: int, sampling: SamplingConfig | None = None,
                 rng: torch.Generator | list[torch.Generator] | None = None, finished: torch.Tensor | None = None,
                 static: StaticDecode | None = None, past=None, record: list | None = None, grammar=None):
    """Decode a left-padded batch with a KV cache, yielding the [batch] tokens of each step.

    grammar: the constrained rows' token masks (`grammar.RowMasks`): each step their logits are masked to
    what their grammar allows, and their matchers advanced by the tokens chosen (a host sync per step).

    record: with `sampling.logprobs` set, each step appends (log p of each row's token [batch], the top
    `sampling.logprobs` log-probabilities [batch, n] and their token ids [batch, n]), on the CPU.

    past: a cache that already holds each row's context (the frozen KV cache's
    `assemble`); `attention_mask` then covers the context and `input_ids`, and
    only `input_ids` is prefilled. Padding may sit inside the mask (context
    padding, then input padding): positions count real tokens only.

    Rows already finished (a stop token, or marked by the caller in `finished`,
    e.g. a cancelled request) get `pad_id`; the loop ends when every row is done.
    The caller may set `finished[row] = True` between steps. `static`: decode
    with fixed shapes (see `StaticDecode`; `past`, if given, is copied into its
    static cache; the caller's marks are read at its sync steps); the same
    computation (compiled bf16 kernels round differently, so near ties can break
    the other way). If its graphs fail, the tokens so far are prefilled eagerly
    over `past` (which the static path leaves untouched) and decoding goes on.
    """
    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    if finished is None:
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    if static is not None:
        produced = []
        try:
            for token in _static_steps(model, static, input_ids, attention_mask, past, max_new_tokens=max_new_tokens,
                                       stop_ids=stop_ids, pad_id=pad_id, sampling=sampling, rng=rng,
                                       finished=finished, record=record, grammar=grammar):
                produced.append(token)
                yield token
            return
        except GraphFailed:
            pass
        if produced:  # go on from the tokens so far, eagerly (rows that stopped meanwhile are marked)
            so_far = torch.stack(produced, dim=1)
            stop = torch.tensor(sorted(stop_ids) or [-1], device=so_far.device)
            finished |= torch.isin(so_far, stop).any(dim=1).cpu()
            input_ids = torch.cat([input_ids, so_far], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(so_far.shape)], dim=1)
        if len(produced) < max_new_tokens:
            yield from decode_steps(model, input_ids, attention_mask, max_new_tokens=max_new_tokens - len(produced),
                                    stop_ids=stop_ids, pad_id=pad_id, sampling=sampling, rng=rng, finished=finished,
                                    past=past, record=record, grammar=grammar)
        return
    batch = input_ids.shape[0]
    # Left padding shifts every row; positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    past = dynamic_cache([], []) if past is None else as_cache(past)
    cache_kw = cache_kwarg(model)
    # logits_to_keep=1: the prompt's other positions would cost a full vocabulary projection each.
    with tracing.span("prefill", rows=batch, tokens=int(input_ids.numel())):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **{cache_kw: past}).logits[:, -1, :]
    stop = torch.tensor(sorted(stop_ids) or [-1], device=input_ids.device)
    next_pos = position_ids[:, -1:] + 1
    # a span across the yields: the caller runs between steps inside it (and opens none of its own)
    with tracing.span("decode", rows=batch, max_new_tokens=max_new_tokens):
        for step in range(max_new_tokens):
            token = choose_tokens(logits if grammar is None else grammar.constrain(logits), sampling, rng)
            done = finished.to(token.device)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            _record(record, sampling, logits, token)
            if grammar is not None:
                grammar.advance(token.tolist(), done.tolist())
            yield token
            finished |= (done | torch.isin(token, stop)).cpu()  # one host sync per token, to stop early
            if bool(finished.all()) or step == max_new_tokens - 1:
                return
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_pos,
                           use_cache=True, **{cache_kw: past}).logits[:, -1, :]
            next_pos = next_pos + 1


def _static_steps(model, static: StaticDecode, input_ids, attention_mask, past, *, max_new_tokens, stop_ids, pad_id,
                  sampling, rng, finished, record, grammar):
    """`decode_steps` with fixed shapes (see `StaticDecode`)."""
    batch, prompt = input_ids.shape
    device = input_ids.device
    bucket = static.prefill_bucket(prompt)
    if bucket is not None and bucket > prompt:  # padding before the prompt, after the context: one graph per bucket
        context = attention_mask[:, :attention_mask.shape[1] - prompt]
        input_ids = torch.cat([input_ids.new_full((batch, bucket - prompt), pad_id), input_ids], dim=1)
        attention_mask = torch.cat([context, attention_mask.new_zeros((batch, bucket - prompt)),
                                    attention_mask[:, -prompt:]], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    length = static.cache_length(attention_mask.shape[1] + max_new_tokens)
    cache = static.cache(batch, length, device, model_dtype(model), past)
    # the mask covers the whole static cache from the start (causal masking hides unwritten slots)
    mask = torch.cat([attention_mask, attention_mask.new_ones((batch, length - attention_mask.shape[1]))], dim=1)
    cache_kw = cache_kwarg(model)
    prefill = partial(static.forward, "prefill") if bucket is not None else static.eager
    first_slot = attention_mask.shape[1] - input_ids.shape[1]  # the prompt's slots follow the context's
    with tracing.span("prefill", rows=batch, tokens=int(input_ids.numel())):
        logits, greedy = prefill(input_ids=input_ids, attention_mask=static.attention_mask(mask, first_slot,
                                                                                            input_ids.shape[1]),
                                 position_ids=position_ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    slot = attention_mask.shape[1]  # the first generated token's
    stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
    done = finished.to(device)
    next_pos = position_ids[:, -1:] + 1
    pending = None  # the host's read of `done` started at the last sync step, in flight
    with tracing.span("decode", rows=batch, max_new_tokens=max_new_tokens):
        for step in range(max_new_tokens):
            if grammar is not None:
                token = choose_tokens(grammar.constrain(logits), sampling, rng)
            else:
                token = greedy if sampling.greedy else choose_tokens(logits, sampling, rng)
            token = torch.where(done, torch.full_like(token, pad_id), token)  # (a new tensor: the replay's outputs
            _record(record, sampling, logits, token)                          # are overwritten by the next one)
            if grammar is not None:
                grammar.advance(token.tolist(), done.tolist())
            yield token
            done = done | torch.isin(token, stop)
            if step == max_new_tokens - 1:
                finished |= done.cpu()
                return
            if pending is not None:
                # Read one step late, after the next step was queued: the GPU runs that step while the host waits
                # and then queues the one after, instead of idling while the host catches up after every sync.
                finished |= pending.result()
                pending = None
                if bool(finished.all()):
                    return
                done = done | finished.to(device)  # with the rows the caller marked (cancelled, stop strings)
            if static.syncs_at(step):
                pending = _HostRead(done)  # the host's one sync in `sync_every` steps
            logits, greedy = static.forward("step", input_ids=token[:, None], attention_mask=static.attention_mask(
                mask, slot, 1), position_ids=next_pos, use_cache=True, **{cache_kw: cache})
            next_pos, slot = next_pos + 1, slot + 1


class _HostRead:
    """A device tensor copied to the host without waiting: on CUDA into pinned memory behind an event, so the
    host goes on queueing work and waits only in `result`; elsewhere at once."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self.host, self.event = tensor.cpu(), None
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           stop_ids: set[int], pad_id: int, sampling: SamplingConfig | None = None,
           rng: torch.Generator | None = None, static: StaticDecode | None = None, past=None) -> list[list[int]]:
    """All new tokens of every row, each cut before its first stop token (`past`: see `decode_steps`)."""
    steps = list(decode_steps(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                              pad_id=pad_id, sampling=sampling, rng=rng, static=static, past=past))
    tokens = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(input_ids.shape[0])]
    return [row[: next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in tokens]


@dataclass
class Generated:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or string), "length" or "cancelled"
    # with SamplingConfig.logprobs: per token of `tokens`, (log p, [(alternative token id, log p), ...])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def generate_batch(model, tokenizer, sequences: list[list[int]], *, stop_ids: set[int], pad_id: int,
                   sampling: SamplingConfig, on_text=None, cancelled=None,
                   static: StaticDecode | None = None, context=None, grammar=None) -> list[Generated]:
    """Decode prompts (token lists) as one batch, with stop strings, streaming and cancellation.

    context: (cache, mask) holding each row's precomputed context (`FrozenKVCache.assemble`);
    `sequences` are then what follows it.

    on_text(row, delta): called as a row's text grows (text that could still turn
    into a stop string, or an incomplete character, is held back until it cannot); with
    `sampling.logprobs`, on_text(row, delta, entries): the (token id, log p, alternatives) of the tokens
    decoded since the previous piece (they may run ahead of the text held back).
    cancelled(row) -> bool: polled every step; a cancelled row stops at once.
    grammar: the constrained rows' token masks (`grammar.RowMasks`; see `decode_steps`).
    """
    device = next(model.parameters()).device
    n = len(sequences)
    sequences, context = _padded_rows(static, sequences, context, grammar)
    input_ids, mask = left_pad(sequences, pad_id, device)
    past = None
    if context is not None:
        past, context_mask = context
        mask = torch.cat([context_mask.to(mask.device), mask], dim=1)
    # One generator per row, each seeded with the request's seed: a request's sample is the same alone or
    # batched (the batcher groups requests with equal SamplingConfig, so equal seeds are per-request seeds).
    rng = None if sampling.greedy else [torch.Generator(device=device).manual_seed(sampling.seed)
                                        for _ in sequences]
    finished = torch.arange(len(sequences)) >= n  # the padding rows are done from the start
    tokens: list[list[int]] = [[] for _ in range(n)]
    record = [] if sampling.logprobs is not None else None
    steps_of: list[list[int]] = [[] for _ in range(n)]  # the decode step of each kept token (its logprobs)
    sent = [0] * n  # tokens whose log-probabilities went out with a streamed piece
    texts, emitted, reasons = [""] * n, [0] * n, [None] * n
    track_text = on_text is not None or bool(sampling.stop)
    hold = max((len(x) for x in sampling.stop), default=1) - 1

    def emit(row: int, final: bool) -> None:
        upto = len(texts[row]) if final else len(texts[row]) - hold
        while upto > emitted[row] and not final and texts[row][upto - 1] == "\ufffd":  # half a UTF-8 character
            upto -= 1
        if on_text is not None and upto > emitted[row]:
            if record is None:
                on_text(row, texts[row][emitted[row]:upto])
            else:  # with the log-probabilities of the tokens decoded since the last piece
                fresh = range(sent[row], len(tokens[row]))
                on_text(row, texts[row][emitted[row]:upto],
                        [(tokens[row][i], *_row_logprobs(record, row, [steps_of[row][i]])[0]) for i in fresh])
                sent[row] = len(tokens[row])
            emitted[row] = upto

    def take(step: int, step_tokens: list[int]) -> None:
        for row, token in enumerate(step_tokens):
            if reasons[row] is not None:
                continue
            if cancelled is not None and cancelled(row):
                reasons[row], finished[row] = "cancelled", True
            elif token in stop_ids:
                reasons[row] = "stop"
            else:
                tokens[row].append(token)
                steps_of[row].append(step)
                if track_text:
                    texts[row] = tokenizer.decode(tokens[row], skip_special_tokens=True)
                    cut = min((i for i in (texts[row].find(x) for x in sampling.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        texts[row], reasons[row], finished[row] = texts[row][:cut], "stop", True
            if track_text:
                emit(row, final=reasons[row] is not None)

    # The tokens are read back (one host sync) only when the decode loop reads its own: every step eagerly; with
    # fixed shapes the first at once (time to first token), then once per `static.sync_every` steps, one step
    # late as the loop does: read while the GPU runs the step queued after them.
    pending: list[torch.Tensor] = []

    def take_pending(keep: int = 0) -> None:
        """Take the pending tokens but the newest `keep` (pending holds the steps up to `step`)."""
        ready, first = pending[:len(pending) - keep], step - len(pending) + 1
        for offset, step_tokens in enumerate(torch.stack(ready)[:, :n].tolist() if ready else []):
            take(first + offset, step_tokens)
        del pending[:len(ready)]

    steps = decode_steps(model, input_ids, mask, max_new_tokens=sampling.max_new_tokens, stop_ids=stop_ids,
                         pad_id=pad_id, sampling=sampling, rng=rng, finished=finished, static=static, past=past,
                         record=record, grammar=grammar)
    step = -1
    for step, step_tokens in enumerate(steps):
        pending.append(step_tokens)
        if static is None or step == 0:
            take_pending()
        elif static.syncs_at(step - 1):
            take_pending(keep=1)
    if pending:
        take_pending()
    results = []
    for row in range(n):
        if not track_text:
            texts[row] = tokenizer.decode(tokens[row], skip_special_tokens=True)
        emit(row, final=True)
        results.append(Generated(tokens[row], texts[row], reasons[row] or "length",
                                 None if record is None else _row_logprobs(record, row, steps_of[row])))
    return results


def _padded_rows(static: StaticDecode | None, sequences: list[list[int]], context, grammar):
    """(sequences, context) with copies of the first row added up to the static path's batch bucket, so that a
    new batch size replays a graph instead of compiling one (the copies start finished and are dropped). Not
    for grammar rows (a matcher per row) or a blended context (a DynamicCache, decoded at its own size)."""
    n = len(sequences)
    if static is None or grammar is not None or static.batch_bucket(n) == n:
        return sequences, context
    if context is not None and not isinstance(context[0], StackedStates):
        return sequences, context
    extra = static.batch_bucket(n) - n
    sequences = sequences + [sequences[0]] * extra
    if context is not None:
        states, mask = context
        context = (StackedStates(_repeat_first(states.keys, 1, extra), _repeat_first(states.values, 1, extra)),
                   _repeat_first(mask, 0, extra))
    return sequences, context


def _repeat_first(t: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    return torch.cat([t, t.narrow(dim, 0, 1).repeat_interleave(extra, dim=dim)], dim=dim)


def _row_logprobs(record: list, row: int, steps: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    out = []
    for s in steps:
        chosen, values, ids = record[s]
        top = [] if ids is None else list(zip(ids[row].tolist(), values[row].tolist()))
        out.append((float(chosen[row]), top))
    return out
