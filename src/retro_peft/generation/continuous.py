"""Iteration-level batching (Orca, vLLM): one running decode batch that rows join and leave at every step.

`BatchRunner` decodes a pass to completion: a row that arrives one token after the pass
started waits for all of it, and a short answer holds its slot until the longest row ends.
`ContinuousBatch` keeps one running batch instead:
- `admit(requests)` prefills the new rows as left-padded batches of similar lengths (`length_groups`; a frozen KV
  cache's rows prefill their tail over the assembled context, as `BatchRunner.inputs`
  gives it), chooses their first token, and merges their KV cache into the running one:
  the narrower of the two is padded on the left with masked zeros, then the rows are
  concatenated along the batch;
- `admit([request], chunk_tokens=N)` with a prompt longer than N prefills it N tokens at a time instead:
  `prefill_chunk()` runs its next chunk (the owner calls it between steps, so the running rows go on
  decoding while a long prompt is read), and the last chunk merges the row into the running batch;
- `step()` runs one forward for every running row (each at its own position), chooses
  each row's token with its own sampling settings and generator, streams its text, and
  retires the rows that finished, stopped or were cancelled at once (`index_select` on
  the batch dimension; columns that are padding in every remaining row are trimmed).

Rows of different adapters decode in one forward through `adapters(tags)`, a context the
owner supplies (the bank's MixedLoRA pass), entered around every forward, since the row
set changes between steps. Greedy answers are those of the row decoded alone: padding is
masked and each row's positions count its real tokens only.

With `static` (a `StaticDecode`; compiled on CUDA) the running rows live in fixed slots of a static
cache instead (`_SlotCache`; vLLM's fixed slots): every step writes the same column for all slots,
a new row's states are copied in so that they end at that column, a finished row's slot is freed
and reused, and the cache is repacked (copied into one of a larger size, the columns no running
row uses dropped) only when rows or columns run out. Its batch sizes and widths come in buckets,
so each step replays one of a few CUDA graphs.

What it does not do, the pass path (`BatchRunner.run`) does: answer choices, JSON grammar
constraints, answerability heads and log-probabilities; `decodes(row, sampling)` says whether a
row is one of its own.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from retro_peft import tracing
from retro_peft.generation.answers import Answer
from retro_peft.generation.decode import Generated, GraphFailed, StaticDecode, left_pad
from retro_peft.generation.prompt import check_fits, model_context
from retro_peft.generation.runner import BatchRunner, Row, make_answer
from retro_peft.generation.sampling import SamplingConfig, choose_tokens
from retro_peft.hf_compat import as_cache, cache_kwarg, cache_layers, dynamic_cache, layer_states, static_cache

# Prompts admitted together prefill as one padded batch while padding adds at most this share to their tokens
# (more rows per prefill save launches on a GPU; less padding saves arithmetic everywhere).
PADDING_SLACK = 0.25


@dataclass(eq=False)
class Request:
    """One row to decode. on_text(delta) streams its text; cancelled() -> bool is polled before every step."""

    row: Row
    sampling: SamplingConfig
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None
    tag: object = None  # what `adapters` is told about the row (its adapter)


@dataclass(eq=False)
class _Running:
    """A running row's decoding state."""

    request: Request
    rng: torch.Generator | None
    position: int  # the position of the next token fed to the model
    next_token: int = -1  # chosen, not yet fed to the model
    slot: int = -1  # its row of the static cache (static decoding)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    reason: str | None = None

    @property
    def hold(self) -> int:  # text that could still turn into a stop string is held back
        return max((len(x) for x in self.request.sampling.stop), default=1) - 1


@dataclass
class Finished:
    request: Request
    answer: Answer


@dataclass(eq=False)
class _Prefill:
    """A prompt being prefilled a chunk at a time (one row, its own cache)."""

    request: Request
    input_ids: torch.Tensor  # [1, tokens]: what follows the context
    mask: torch.Tensor  # [1, context + tokens]
    cache: object
    done: int = 0  # tokens of input_ids prefilled so far


class ContinuousBatch:
    """One running decode batch over `runner`'s model (read at every forward: its owner may wrap it, e.g. when a
    first adapter is loaded). adapters(tags) -> context manager: the adapter context of a forward over rows with
    these tags (None: the model as it is)."""

    def __init__(self, runner: BatchRunner, adapters: Callable[[list], contextlib.AbstractContextManager] | None = None,
                 static: StaticDecode | None = None):
        self.runner = runner
        self.adapters = adapters or (lambda tags: contextlib.nullcontext())
        self.rows: list[_Running] = []
        self._cache = None  # DynamicCache over self.rows, [rows, kv_heads, width, head_dim] per layer
        self._mask: torch.Tensor | None = None  # [rows, width]: 1 where a row has a real token
        self._prefill: _Prefill | None = None  # a long prompt being prefilled a chunk at a time
        # static decoding: the rows in slots of a static cache (transformers' full-attention layers only)
        self._slots = _SlotCache(static) if static is not None and _SlotCache.fits(static.model) else None

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def tags(self) -> set:
        """The running rows' tags, and the tag of the row being prefilled."""
        return {r.request.tag for r in self.rows} | ({self._prefill.request.tag} if self._prefill else set())

    @property
    def prefilling(self) -> bool:
        """Whether a long prompt is being prefilled a chunk at a time (`prefill_chunk` goes on with it)."""
        return self._prefill is not None

    @staticmethod
    def decodes(row: Row, sampling: SamplingConfig) -> bool:
        """Whether this engine decodes the row (else the pass path must: see the module's docstring)."""
        return not row.choices and row.constraint is None and row.answerability is None and sampling.logprobs is None

    # -- admission ---------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, requests: list[Request], chunk_tokens: int | None = None) -> list[Finished]:
        """Prefill `requests` and add them to the running batch; returns those already finished (a first token
        that stops, or max_tokens 1). Raises InputError (nothing admitted) if a prompt does not fit the model.
        chunk_tokens: one request whose prompt is longer is prefilled that many tokens at a time, its first chunk
        now and the others by `prefill_chunk`."""
        if not requests:
            return []
        if self._prefill is not None:
            raise ValueError("a prompt is still being prefilled in chunks: prefill_chunk() until it is done")
        for request in requests:
            if not self.decodes(request.row, request.sampling):
                raise ValueError("ContinuousBatch cannot decode this row (choices, a constraint, an answerability "
                                 "head or logprobs): use BatchRunner")
            check_fits([request.row.prompt], request.sampling.max_new_tokens, model_context(self.runner.model))
        if chunk_tokens is not None and len(requests) == 1:
            return self._join(requests, chunk_tokens)
        finished = []
        for group in length_groups([len(r.row.prompt.input_ids) for r in requests]):
            finished += self._join([requests[i] for i in group])
        return finished

    def _join(self, requests: list[Request], chunk_tokens: int | None = None) -> list[Finished]:
        """Prefill `requests` as one left-padded batch and merge them into the running one (see `admit`)."""
        model = self.runner.model
        device = next(model.parameters()).device
        with self.adapters([r.tag for r in requests]):
            sequences, context = self.runner.inputs([r.row for r in requests])
            input_ids, mask = left_pad(sequences, self.runner.pad_id, device)
            past = None
            if context is not None:
                past, context_mask = context
                mask = torch.cat([context_mask.to(device), mask], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = as_cache(past) if past is not None else dynamic_cache([], [])
            if chunk_tokens is not None and input_ids.shape[1] > chunk_tokens:
                self._prefill = _Prefill(requests[0], input_ids, mask, cache)
                return self.prefill_chunk(chunk_tokens)
            with tracing.span("prefill", rows=len(requests), tokens=int(input_ids.numel())):
                logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions[:, -input_ids.shape[1]:],
                               use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1, :]
        fresh = [_Running(r, None if r.sampling.greedy else
                          torch.Generator(device=device).manual_seed(r.sampling.seed), int(positions[i, -1]) + 1)
                 for i, r in enumerate(requests)]
        self._merge(fresh, cache, mask)
        return self._take(fresh, logits)

    @torch.inference_mode()
    def prefill_chunk(self, chunk_tokens: int) -> list[Finished]:
        """The next `chunk_tokens` of the prompt being prefilled; after its last chunk the row joins the running
        batch (returned if its first token already ends it). A cancelled one is dropped."""
        pending = self._prefill
        if pending is None:
            return []
        request = pending.request
        if request.cancelled is not None and request.cancelled():
            self._prefill = None
            r = _Running(request, None, 0, reason="cancelled")
            return [self._finish(r)]
        model = self.runner.model
        tokens = pending.input_ids.shape[1]
        end = min(pending.done + chunk_tokens, tokens)
        width = pending.mask.shape[1] - tokens + end  # the context and the prompt up to this chunk's end
        mask = pending.mask[:, :width]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -(end - pending.done):]
        with self.adapters([request.tag]), tracing.span("prefill", rows=1, tokens=end - pending.done):
            logits = model(input_ids=pending.input_ids[:, pending.done:end], attention_mask=mask,
                           position_ids=positions, use_cache=True, logits_to_keep=1,
                           **{cache_kwarg(model): pending.cache}).logits[:, -1, :]
        pending.done = end
        if end < tokens:
            return []
        self._prefill = None
        device = mask.device
        fresh = [_Running(request, None if request.sampling.greedy else
                          torch.Generator(device=device).manual_seed(request.sampling.seed), int(positions[0, -1]) + 1)]
        self._merge(fresh, pending.cache, pending.mask)
        return self._take(fresh, logits)

    def _merge(self, fresh: list[_Running], cache, mask: torch.Tensor) -> None:
        if self._slots is not None:
            self._slots.merge(self.rows, fresh, cache, mask)
            self.rows = self.rows + fresh
            self._cache = self._slots.cache
            return
        if not self.rows:
            self.rows, self._cache, self._mask = fresh, cache, mask
            return
        width = max(mask.shape[1], self._mask.shape[1])
        keys, values = [], []
        for layer in range(cache_layers(self._cache)):
            old_k, old_v = layer_states(self._cache, layer)
            new_k, new_v = layer_states(cache, layer)
            keys.append(torch.cat([_pad_left(old_k, width, 2), _pad_left(new_k, width, 2)], dim=0))
            values.append(torch.cat([_pad_left(old_v, width, 2), _pad_left(new_v, width, 2)], dim=0))
        self._cache = dynamic_cache(keys, values)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self.rows = self.rows + fresh

    # -- decoding ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Cancelled rows leave; one forward for the others; returns the rows that finished."""
        done = [r for r in self.rows if r.request.cancelled is not None and r.request.cancelled()]
        for r in done:
            r.reason = "cancelled"
        finished = [self._finish(r) for r in done]
        self._retire()
        if not self.rows:
            return finished
        model = self.runner.model
        if self._slots is not None:
            logits = self._slots.step(self.rows, self.runner.pad_id, self.adapters)
        else:
            device = self._mask.device
            tokens = torch.tensor([[r.next_token] for r in self.rows], device=device)
            positions = torch.tensor([[r.position] for r in self.rows], device=device)
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
            with self.adapters([r.request.tag for r in self.rows]):
                logits = model(input_ids=tokens, attention_mask=self._mask, position_ids=positions, use_cache=True,
                               **{cache_kwarg(model): self._cache}).logits[:, -1, :]
        for r in self.rows:
            r.position += 1
        finished += self._take(self.rows, logits)
        return finished

    def _take(self, rows: list[_Running], logits: torch.Tensor) -> list[Finished]:
        """Choose each row's next token from its logits (row i of `logits` is rows[i]); retire those that end."""
        greedy = logits.argmax(dim=-1).tolist()
        finished = []
        for i, r in enumerate(rows):
            sampling = r.request.sampling
            token = greedy[i] if sampling.greedy else int(choose_tokens(logits[i:i + 1], sampling, [r.rng])[0])
            if token in self.runner.stop_ids:
                r.reason = "stop"
            else:
                r.tokens.append(token)
                r.next_token = token
                if r.request.on_text is not None or sampling.stop:
                    r.text = self.runner.tokenizer.decode(r.tokens, skip_special_tokens=True)
                    cut = min((i for i in (r.text.find(x) for x in sampling.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        r.text, r.reason = r.text[:cut], "stop"
                if r.reason is None and len(r.tokens) >= sampling.max_new_tokens:
                    r.reason = "length"
                if r.reason is None:
                    self._emit(r, final=False)
            if r.reason is not None:
                finished.append(self._finish(r))
        self._retire()
        return finished

    def _emit(self, r: _Running, final: bool) -> None:
        if r.request.on_text is None:
            return
        upto = len(r.text) if final else len(r.text) - r.hold
        while upto > r.emitted and not final and r.text[upto - 1] == "\ufffd":  # half a UTF-8 character
            upto -= 1
        if upto > r.emitted:
            r.request.on_text(r.text[r.emitted:upto])
            r.emitted = upto

    def _finish(self, r: _Running) -> Finished:
        if r.request.on_text is None and not r.request.sampling.stop:
            r.text = self.runner.tokenizer.decode(r.tokens, skip_special_tokens=True)
        self._emit(r, final=True)
        return Finished(r.request, make_answer(r.request.row, Generated(r.tokens, r.text, r.reason)))

    def _retire(self) -> None:
        """Drop the rows that ended from the batch, and the columns that are padding in every row left."""
        keep = [i for i, r in enumerate(self.rows) if r.reason is None]
        if len(keep) == len(self.rows):
            return
        if self._slots is not None:
            self._slots.free([r for r in self.rows if r.reason is not None])
            self.rows = [self.rows[i] for i in keep]
            self._cache = self._slots.cache
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # the first column some row uses
        keys, values = [], []
        for layer in range(cache_layers(self._cache)):
            k, v = layer_states(self._cache, layer)
            keys.append(k.index_select(0, index)[:, :, start:])
            values.append(v.index_select(0, index)[:, :, start:])
        self._cache, self._mask = dynamic_cache(keys, values), mask[:, start:]


class _SlotCache:
    """The running rows' states in the fixed slots of a static cache (`ContinuousBatch` with `static`).

    Every slot writes column `column` at each step (transformers' static layers share one write position),
    so a row joins with its states copied into its slot's columns [column - width, column), masked where
    they are padding; a row's positions count its own tokens, so where its states sit does not matter.
    A freed slot keeps attending to its own newest column (its logits are not read), which keeps its
    softmax finite. The cache is repacked into another one when slots or columns run out, and when a
    joining row is wider than `column`: only the columns some running row uses are copied, ending at the
    new column. Shapes are `StaticDecode`'s batch buckets by power-of-two widths (at least MIN_WIDTH), and
    caches are kept per shape (`spares`), so that compiled steps replay over the same memory."""

    MIN_WIDTH = 256
    SPARES = 1  # caches of another shape kept for reuse (an 8B model's 32 x 4096 cache is 16 GiB)

    def __init__(self, static: StaticDecode):
        self.static = static
        self.cache = None
        self.mask: torch.Tensor | None = None  # [slots, width]
        self.by_slot: list[_Running | None] = []  # each slot's row (None: free)
        self.column = 0
        self.spares: OrderedDict = OrderedDict()

    @staticmethod
    def fits(model) -> bool:
        """Whether every layer's static cache is a plain one (written at one shared column): not sliding-window
        layers, which write round a ring (those models decode in the dynamic cache)."""
        try:
            from transformers.cache_utils import StaticLayer
        except ImportError:  # transformers 4.x keeps a static cache's states otherwise
            return False
        probe = static_cache(model.config, batch=1, length=64, device="cpu", dtype=torch.float32)
        return all(type(layer) is StaticLayer for layer in getattr(probe, "layers", [None]))

    def width_for(self, columns: int) -> int:
        return max(self.MIN_WIDTH, 1 << (columns - 1).bit_length())

    def merge(self, running: list[_Running], fresh: list[_Running], cache, mask: torch.Tensor) -> None:
        """Copy `fresh` rows' states (`cache`, [rows, ..., width, ...], and `mask`) into free slots."""
        width = mask.shape[1]
        remaining = max(r.request.sampling.max_new_tokens - len(r.tokens) for r in running + fresh)
        used = self.column - int(self.mask.any(dim=0).long().argmax()) if running else 0  # columns in use
        end = max(self.column if running else 0, width)
        slots = len(running) + len(fresh)
        if (self.cache is None or slots > len(self.by_slot) or end > self.column
                or end + remaining > self.mask.shape[1]):
            end = max(used, width)
            self._repack(self.static.batch_bucket(slots), self.width_for(end + remaining), end, used, cache)
        free = (i for i, r in enumerate(self.by_slot) if r is None)
        for r in fresh:
            r.slot = next(free)
            self.by_slot[r.slot] = r
        slots = torch.tensor([r.slot for r in fresh], device=self.mask.device)
        for layer in range(cache_layers(cache)):  # each fresh row i into its slot, columns [end - width, end)
            for new, held in zip(layer_states(cache, layer), layer_states(self.cache, layer)):
                held[slots, :, end - width:end] = new
        self.mask[slots] = 0
        self.mask[slots, end - width:end] = mask.to(self.mask.dtype)

    def _repack(self, slots: int, width: int, end: int, used: int, like) -> None:
        """Move to a cache of `slots` x `width` whose write column is `end`, the last `used` columns of the
        current one (every running row's states) copied to end there; slots keep their numbers."""
        old, old_mask, old_column = self.cache, self.mask, self.column
        sample = layer_states(like, 0)[0]  # the states' device and dtype
        cache = self.spares.pop((slots, width), None)
        if cache is None:
            cache = static_cache(self.static.model.config, batch=slots, length=width, device=sample.device,
                                 dtype=sample.dtype)
        for layer in range(cache_layers(like)):
            keys, values = layer_states(like, layer)
            state = cache.layers[layer]
            if not state.is_initialized:
                state.lazy_initialization(keys.new_zeros((slots, *keys.shape[1:-2], 1, keys.shape[-1])),
                                          values.new_zeros((slots, *values.shape[1:-2], 1, values.shape[-1])))
            if old is not None and used:
                src_keys, src_values = layer_states(old, layer)
                state.keys[:len(self.by_slot), :, end - used:end] = src_keys[:, :, old_column - used:old_column]
                state.values[:len(self.by_slot), :, end - used:end] = src_values[:, :, old_column - used:old_column]
            state.cumulative_length.fill_(end)
        mask = torch.zeros((slots, width), dtype=torch.long, device=sample.device)
        if old is not None and used:
            mask[:len(self.by_slot), end - used:end] = old_mask[:, old_column - used:old_column]
        if old is not None:
            self._keep((len(self.by_slot), old_mask.shape[1]), old)
        self.cache, self.mask, self.column = cache, mask, end
        self.by_slot = self.by_slot + [None] * (slots - len(self.by_slot))

    def _keep(self, shape, cache) -> None:
        self.spares[shape] = cache
        while len(self.spares) > self.SPARES:
            self.spares.popitem(last=False)

    def step(self, running: list[_Running], pad_id: int, adapters) -> torch.Tensor:
        """One forward of every slot; the running rows' last-position logits, in `running`'s order."""
        model = self.static.model
        tokens = torch.full((len(self.by_slot), 1), pad_id, dtype=torch.long)
        positions = torch.zeros((len(self.by_slot), 1), dtype=torch.long)
        for r in running:
            tokens[r.slot, 0], positions[r.slot, 0] = r.next_token, r.position
        self.mask[:, self.column] = 1
        inputs = dict(input_ids=tokens.to(self.mask.device), attention_mask=self.mask,
                      position_ids=positions.to(self.mask.device), use_cache=True,
                      **{cache_kwarg(model): self.cache})
        with adapters([r.request.tag if r is not None else None for r in self.by_slot]):
            try:
                logits, _ = self.static.forward("step", **inputs)
            except GraphFailed:  # warned once; this and later steps run eagerly, from the same write column
                for layer in self.cache.layers:
                    layer.cumulative_length.fill_(self.column)
                logits, _ = self.static.forward("step", **inputs)
        self.column += 1
        return logits[[r.slot for r in running]]

    def free(self, rows: list[_Running]) -> None:
        for r in rows:
            self.by_slot[r.slot] = None
            self.mask[r.slot] = 0
        if all(r is None for r in self.by_slot):  # empty: the cache waits for the next batch of its shape
            self._keep((len(self.by_slot), self.mask.shape[1]), self.cache)
            self.cache, self.mask, self.by_slot, self.column = None, None, [], 0


def length_groups(lengths: list[int], slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices of `lengths` (prompt tokens) in the groups admitted as one left-padded prefill each: by length, a
    group grows while its padded size (rows x its longest) stays within (1 + slack) x its real tokens. Padding
    is computed like real tokens: prompts of 100-700 tokens padded to one width waste up to ~40% of a prefill."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= (1 + slack) * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros before its entries along `dim`, up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
