"""Retrieve -> prompt -> generate, one request or a batch.

The decode loop is `decode()`: a small explicit loop over `past_key_values`
(prefill the whole left-padded batch once, then one forward per new token for
the whole batch). Keeping it explicit is deliberate: precomputed per-chunk KV
states can replace the prefill later, and `StaticDecode` replaces the decode
step (a preallocated cache and, on CUDA, one compiled CUDA-graph replay per token).
"""

from __future__ import annotations

import inspect
import queue
import re
import string
import threading
from dataclasses import dataclass, field

import torch

from retro_peft.adapters.config import RetrievalConfig
from retro_peft.errors import InputError
from retro_peft.generation.prompt import (Passage, Prompt, build_prompt, check_fits, end_of_turn_ids,
                                          model_context)


@dataclass
class Answer:
    text: str
    citations: list[tuple[str, str, str, float]] = field(default_factory=list)  # (chunk_id, doc_id, title, score)
    abstained: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    passages: list[Passage] = field(default_factory=list, repr=False)  # what the prompt held
    finish_reason: str = "stop"  # "stop", "length" or "cancelled"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


# Words for "does this text hold the answer": a number keeps its decimal point or separators ("0.8" is one
# word, so "8" is not in it), other punctuation separates ("32-token" holds "32"); case and articles aside.
_WORD = re.compile(r"\d+(?:[.,]\d+)*|[^\W_]+")


def _words(text: str) -> str:
    return " ".join(w for w in _WORD.findall(text.lower()) if w not in ("a", "an", "the"))


def mentions(text: str, answer: str) -> bool:
    """`answer` occurs in `text` as whole words: "1" is not in "1945", "8" not in "0.8" or "448"."""
    answer = _words(answer)
    return bool(answer) and f" {answer} " in f" {_words(text)} "


def is_abstention(text: str, phrase: str) -> bool:
    """The answer is (or starts with) the abstention phrase, after normalisation."""
    norm, target = normalize_answer(text), normalize_answer(phrase)
    return bool(target) and norm.startswith(target)


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
    return input_ids.to(device), attention_mask.to(device)


def cache_kwarg(model) -> str:
    """transformers 5.x names the KV cache argument `cache`; older versions `past_key_values`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class SearchOptions:
    """One request's retrieval settings in place of its domain's (None or empty: the domain's own).

    Frozen and hashable, so requests with equal options can share a decode pass.
    filters: ((field, (accepted values...)), ...), sorted; build it with `SearchOptions.of`.
    """

    k: int | None = None
    mode: str | None = None
    filters: tuple[tuple[str, tuple], ...] = ()

    @classmethod
    def of(cls, k: int | None = None, mode: str | None = None, filters: dict | None = None) -> "SearchOptions":
        items = ((name, tuple(v) if isinstance(v, (list, tuple)) else (v,)) for name, v in (filters or {}).items())
        return cls(k, mode, tuple(sorted(items)))

    def filter_dict(self) -> dict | None:
        return {name: list(values) for name, values in self.filters} or None


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. temperature 0 is greedy decoding (deterministic)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise InputError(f"temperature must be between 0 and 5, got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise InputError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_tokens(logits: torch.Tensor, sampling: SamplingConfig,
                  rng: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One token per row. rng: one generator per row, so a row's draws never depend on the rows beside it
    (a single generator would be advanced by each row in turn); a single one is shared by all rows."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if isinstance(rng, (list, tuple)):
        if len(rng) != probs.shape[0]:
            raise InputError(f"sampling needs one generator per row: {len(rng)} for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, rng)])
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


class StaticDecode:
    """The decode step with fixed shapes, so that it can run as one CUDA graph.

    Eager decoding on a GPU is bound by launching kernels, not by arithmetic (a
    Llama-1B step issues hundreds of small kernels). Here the KV cache is a
    `StaticCache` (allocated once per batch for context + prompt + max_new_tokens,
    rounded up to a multiple of `LENGTH_STEP`, and written in place; a frozen KV
    cache's assembled context is copied into its first slots) and the attention
    mask has its final length from the start (causal masking hides the slots not
    written yet), so every step has the same shapes and
    `torch.compile(mode="reduce-overhead")` replays it as a CUDA graph. The first
    call per batch shape compiles (tens of seconds); later calls replay.
    `compile=False` runs the same static path eagerly (any device): the tests
    check it against the ordinary path. Use a compiled one from one thread: torch
    keeps CUDA-graph state per thread, and another thread fails an assertion in
    `torch._inductor.cudagraph_trees` (seen when a second server app in the same
    process started its own batcher thread).
    """

    def __init__(self, model, compile: bool = True):
        self.model = model
        device = next(model.parameters()).device
        if compile and device.type != "cuda":
            raise InputError(f"compiled decoding replays CUDA graphs: it needs a CUDA device, the model is on {device}")
        self.forward = torch.compile(model.forward, mode="reduce-overhead") if compile else model.forward

    LENGTH_STEP = 64  # cache lengths are rounded up to a multiple of this, so nearby prompt lengths share a graph

    def cache_length(self, tokens: int) -> int:
        return -(-tokens // self.LENGTH_STEP) * self.LENGTH_STEP

    def new_cache(self, batch: int, length: int, device, dtype, context=None):
        """A StaticCache of `length` slots; `context` (a cache of precomputed states) is written into its first ones."""
        from transformers import StaticCache

        # transformers 5 sizes the buffers at the first update; 4.x needs batch, device and dtype up front
        cache = StaticCache(config=self.model.config, max_cache_len=length, max_batch_size=batch, device=device,
                            dtype=dtype)
        if context is not None:  # its slots come first: the prompt's tokens are written after them
            import transformers

            if int(transformers.__version__.split(".")[0]) < 5:
                # 4.x places the prompt at the count of non-zero slots in row 0, which context padding breaks
                raise InputError("static decoding with a frozen KV cache's context needs transformers >= 5, "
                                 f"found {transformers.__version__}")
            for layer in range(self.model.config.num_hidden_layers):
                cache.update(*layer_states(context, layer), layer)  # appended: slots 0..context width
        return cache


def layer_states(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


@torch.inference_mode()
def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 stop_ids: set[int], pad_id: int, sampling: SamplingConfig | None = None,
                 rng: torch.Generator | list[torch.Generator] | None = None, finished: torch.Tensor | None = None,
                 static: StaticDecode | None = None, past=None):
    """Decode a left-padded batch with a KV cache, yielding the [batch] tokens of each step.

    past: a cache that already holds each row's context (the frozen KV cache's
    `assemble`); `attention_mask` then covers the context and `input_ids`, and
    only `input_ids` is prefilled. Padding may sit inside the mask (context
    padding, then input padding): positions count real tokens only.

    Rows already finished (a stop token, or marked by the caller in `finished`,
    e.g. a cancelled request) get `pad_id`; the loop ends when every row is done.
    The caller may set `finished[row] = True` between steps. `static`: decode
    with fixed shapes (see `StaticDecode`; `past`, if given, is copied into its
    static cache); the same computation (compiled bf16 kernels round
    differently, so near ties can break the other way).
    """
    from transformers import DynamicCache

    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    batch = input_ids.shape[0]
    # Left padding shifts every row; positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    step_forward = model
    if static is None:
        past = DynamicCache() if past is None else past
    else:  # the mask covers the whole static cache from the start (causal masking hides unwritten slots)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        length = static.cache_length(attention_mask.shape[1] + max_new_tokens)
        past = static.new_cache(batch, length, input_ids.device, dtype, past)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, length - attention_mask.shape[1]))],
                                   dim=1)
        step_forward = static.forward
    cache_kw = cache_kwarg(model)
    # logits_to_keep=1: the prompt's other positions would cost a full vocabulary projection each.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, logits_to_keep=1, **{cache_kw: past}).logits[:, -1, :]
    stop = torch.tensor(sorted(stop_ids) or [-1], device=input_ids.device)
    if finished is None:
        finished = torch.zeros(batch, dtype=torch.bool)
    next_pos = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        token = choose_tokens(logits, sampling, rng)
        done = finished.to(token.device)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        yield token
        finished |= (done | torch.isin(token, stop)).cpu()  # one host sync per token, to stop early
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if static is None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        # (a CUDA-graph replay overwrites its outputs: the logits are used up before the next step)
        logits = step_forward(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_pos,
                              use_cache=True, **{cache_kw: past}).logits[:, -1, :]
        next_pos = next_pos + 1


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


def generate_batch(model, tokenizer, sequences: list[list[int]], *, stop_ids: set[int], pad_id: int,
                   sampling: SamplingConfig, on_text=None, cancelled=None,
                   static: StaticDecode | None = None, context=None) -> list[Generated]:
    """Decode prompts (token lists) as one batch, with stop strings, streaming and cancellation.

    context: (cache, mask) holding each row's precomputed context (`FrozenKVCache.assemble`);
    `sequences` are then what follows it.

    on_text(row, delta): called as a row's text grows (text that could still turn
    into a stop string, or an incomplete character, is held back until it cannot).
    cancelled(row) -> bool: polled every step; a cancelled row stops at once.
    """
    device = next(model.parameters()).device
    input_ids, mask = left_pad(sequences, pad_id, device)
    past = None
    if context is not None:
        past, context_mask = context
        mask = torch.cat([context_mask.to(mask.device), mask], dim=1)
    n = len(sequences)
    # One generator per row, each seeded with the request's seed: a request's sample is the same alone or
    # batched (the batcher groups requests with equal SamplingConfig, so equal seeds are per-request seeds).
    rng = None if sampling.greedy else [torch.Generator(device=device).manual_seed(sampling.seed) for _ in range(n)]
    finished = torch.zeros(n, dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in range(n)]
    texts, emitted, reasons = [""] * n, [0] * n, [None] * n
    track_text = on_text is not None or bool(sampling.stop)
    hold = max((len(x) for x in sampling.stop), default=1) - 1

    def emit(row: int, final: bool) -> None:
        upto = len(texts[row]) if final else len(texts[row]) - hold
        while upto > emitted[row] and not final and texts[row][upto - 1] == "\ufffd":  # half a UTF-8 character
            upto -= 1
        if on_text is not None and upto > emitted[row]:
            on_text(row, texts[row][emitted[row]:upto])
            emitted[row] = upto

    for step in decode_steps(model, input_ids, mask, max_new_tokens=sampling.max_new_tokens, stop_ids=stop_ids,
                             pad_id=pad_id, sampling=sampling, rng=rng, finished=finished, static=static,
                             past=past):
        for row, token in enumerate(step.tolist()):
            if reasons[row] is not None:
                continue
            if cancelled is not None and cancelled(row):
                reasons[row], finished[row] = "cancelled", True
            elif token in stop_ids:
                reasons[row] = "stop"
            else:
                tokens[row].append(token)
                if track_text:
                    texts[row] = tokenizer.decode(tokens[row], skip_special_tokens=True)
                    cut = min((i for i in (texts[row].find(x) for x in sampling.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        texts[row], reasons[row], finished[row] = texts[row][:cut], "stop", True
            if track_text:
                emit(row, final=reasons[row] is not None)
    results = []
    for row in range(n):
        if not track_text:
            texts[row] = tokenizer.decode(tokens[row], skip_special_tokens=True)
        emit(row, final=True)
        results.append(Generated(tokens[row], texts[row], reasons[row] or "length"))
    return results


class Generator:
    """Answer questions from an index with a (PEFT-wrapped or plain) causal LM."""

    def __init__(self, model, tokenizer, index=None, retrieval: RetrievalConfig | None = None, *,
                 max_new_tokens: int = 24, batch_size: int = 8, compile_decode: bool = False, kv_cache=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        # kv_cache: a FrozenKVCache of `index` for this model; prompts then prefill only their question
        self.kv_cache = None if kv_cache is None else kv_cache.attach(model)
        if self.kv_cache is not None:
            self.kv_cache.check(index=index, tokenizer=tokenizer, retrieval=retrieval or RetrievalConfig())
        # compile_decode (CUDA): each decode step one CUDA-graph replay; the first batch of a shape compiles
        self.static = StaticDecode(model) if compile_decode else None
        self.tokenizer = tokenizer
        self.index = index
        self.retrieval = retrieval or RetrievalConfig()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def device(self):
        return next(self.model.parameters()).device

    def retrieve(self, questions: list[str], search: SearchOptions | None = None) -> list[list[Passage]]:
        search = search or SearchOptions()
        k = self.retrieval.k if search.k is None else search.k
        if self.index is None or k == 0:
            return [[] for _ in questions]
        hits = self.index.search_many(list(questions), k=k, mode=search.mode or self.retrieval.mode,
                                      filters=search.filter_dict())
        return [[Passage.from_hit(h) for h in row] for row in hits]

    def prompts(self, questions: list[str], passages: list[list[Passage]] | None = None,
                search: SearchOptions | None = None) -> list[Prompt]:
        passages = self.retrieve(questions, search) if passages is None else passages
        return [build_prompt(self.tokenizer, q, p, self.retrieval) for q, p in zip(questions, passages)]

    def cached_prompts(self, questions: list[str], passages: list[list[Passage]] | None = None,
                       search: SearchOptions | None = None) -> list:
        """The prompts as the frozen KV cache runs them (`CachedPrompt`: stored segments + tail); needs kv_cache."""
        passages = self.retrieve(questions, search) if passages is None else passages
        return self.kv_cache.prompts(self.tokenizer, questions, passages, self.retrieval)

    def sampling(self, sampling: SamplingConfig | None = None) -> SamplingConfig:
        return sampling or SamplingConfig(max_new_tokens=self.max_new_tokens)

    def answer(self, question: str, *, passages: list[Passage] | None = None,
               sampling: SamplingConfig | None = None, on_text=None) -> Answer:
        """One answer; `on_text(delta)` streams its text as it is generated."""
        stream = None if on_text is None else (lambda _row, delta: on_text(delta))
        return self.answer_many([question], passages=None if passages is None else [passages], sampling=sampling,
                                on_text=stream)[0]

    def stream(self, question: str, *, sampling: SamplingConfig | None = None):
        """Yield the answer's text pieces as tokens are produced, then the final `Answer`."""
        return stream_answer(lambda on_text: self.answer(question, sampling=sampling, on_text=on_text))

    def answer_many(self, questions: list[str], *, passages: list[list[Passage]] | None = None,
                    sampling: SamplingConfig | None = None, search: SearchOptions | None = None, on_text=None,
                    cancelled=None) -> list[Answer]:
        if isinstance(questions, str):
            raise InputError("answer_many takes a list of questions")
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise InputError("the question is empty")
        from retro_peft.kvcache.frozen import decode_inputs

        sampling = self.sampling(sampling)
        if self.kv_cache is not None:
            cached = self.cached_prompts(questions, passages, search)
            prompts, rows = [c.prompt for c in cached], [(self.kv_cache, c) for c in cached]
        else:
            prompts = self.prompts(questions, passages, search)
            rows = [(None, p) for p in prompts]
        check_fits(prompts, sampling.max_new_tokens, model_context(self.model))
        answers: list[Answer] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start:start + self.batch_size]
                shift = lambda f: None if f is None else (lambda row, *a: f(start + row, *a))  # noqa: E731
                sequences, context = decode_inputs(rows[start:start + self.batch_size], self.device)
                done = generate_batch(self.model, self.tokenizer, sequences, stop_ids=self.stop_ids,
                                      pad_id=self.pad_id, sampling=sampling, on_text=shift(on_text),
                                      cancelled=shift(cancelled), static=self.static, context=context)
                answers.extend(self.make_answer(p, g) for p, g in zip(batch, done))
        finally:
            self.model.train(was_training)
        return answers

    def make_answer(self, prompt: Prompt, generated: Generated) -> Answer:
        text = generated.text.strip()
        abstained = is_abstention(text, self.retrieval.abstention)
        return Answer(text=text, citations=[] if abstained else cite(text, prompt.passages), abstained=abstained,
                      prompt_tokens=len(prompt.input_ids), completion_tokens=len(generated.tokens),
                      passages=prompt.passages, finish_reason=generated.finish_reason)


def stream_answer(run):
    """Turn a callback-streaming call `run(on_text) -> Answer` into an iterator of pieces, then the Answer."""
    pieces: queue.Queue = queue.Queue()
    result: dict = {}

    def work():
        try:
            result["answer"] = run(pieces.put)
        except BaseException as e:  # re-raised in the consumer's thread
            result["error"] = e
        finally:
            pieces.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (piece := pieces.get()) is not None:
        yield piece
    if "error" in result:
        raise result["error"]
    yield result["answer"]


def cite(answer: str, passages: list[Passage]) -> list[tuple[str, str, str, float]]:
    """The passages that contain the answer (as whole words); if none does, every passage the prompt held."""
    hits = [p for p in passages if mentions(p.text, answer)] or list(passages)
    return [(p.chunk_id, p.doc_id, p.title, p.score) for p in hits]
