"""The decode loop: a left-padded batch prefilled once, then one forward per new token for the whole batch.

`decode_steps` is a small explicit loop over the KV cache, kept explicit on purpose: a
frozen KV cache's stored states replace part of the prefill (`past`), and `StaticDecode`
replaces the decode step (a preallocated cache and, on CUDA, one CUDA-graph replay per
token). `generate_batch` adds what a request needs around it: stop strings, streaming
text as it grows, cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache

from retro_peft.errors import InputError
from retro_peft.generation.sampling import SamplingConfig, choose_tokens
from retro_peft.hf_compat import TRANSFORMERS_MAJOR, cache_kwarg, layer_states, static_cache
from retro_peft.base_model import model_dtype


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
        cache = static_cache(self.model.config, batch=batch, length=length, device=device, dtype=dtype)
        if context is not None:  # its slots come first: the prompt's tokens are written after them
            if TRANSFORMERS_MAJOR < 5:
                # 4.x places the prompt at the count of non-zero slots in row 0, which context padding breaks
                raise InputError("static decoding with a frozen KV cache's context needs transformers >= 5, "
                                 f"found {transformers.__version__}")
            for layer in range(self.model.config.num_hidden_layers):
                cache.update(*layer_states(context, layer), layer)  # appended: slots 0..context width
        return cache


@torch.inference_mode()
def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 stop_ids: set[int], pad_id: int, sampling: SamplingConfig | None = None,
                 rng: torch.Generator | list[torch.Generator] | None = None, finished: torch.Tensor | None = None,
                 static: StaticDecode | None = None, past=None, record: list | None = None):
    """Decode a left-padded batch with a KV cache, yielding the [batch] tokens of each step.

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
    static cache); the same computation (compiled bf16 kernels round
    differently, so near ties can break the other way).
    """
    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    batch = input_ids.shape[0]
    # Left padding shifts every row; positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    step_forward = model
    if static is None:
        past = DynamicCache() if past is None else past
    else:  # the mask covers the whole static cache from the start (causal masking hides unwritten slots)
        dtype = model_dtype(model)
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
        if record is not None and sampling.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = logp.topk(sampling.logprobs, dim=-1) if sampling.logprobs else None
            record.append((logp.gather(-1, token[:, None])[:, 0].cpu(),
                           None if top is None else top.values.cpu(), None if top is None else top.indices.cpu()))
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
    # with SamplingConfig.logprobs: per token of `tokens`, (log p, [(alternative token id, log p), ...])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def generate_batch(model, tokenizer, sequences: list[list[int]], *, stop_ids: set[int], pad_id: int,
                   sampling: SamplingConfig, on_text=None, cancelled=None,
                   static: StaticDecode | None = None, context=None) -> list[Generated]:
    """Decode prompts (token lists) as one batch, with stop strings, streaming and cancellation.

    context: (cache, mask) holding each row's precomputed context (`FrozenKVCache.assemble`);
    `sequences` are then what follows it.

    on_text(row, delta): called as a row's text grows (text that could still turn
    into a stop string, or an incomplete character, is held back until it cannot); with
    `sampling.logprobs`, on_text(row, delta, entries): the (token id, log p, alternatives) of the tokens
    decoded since the previous piece (they may run ahead of the text held back).
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

    for step in decode_steps(model, input_ids, mask, max_new_tokens=sampling.max_new_tokens, stop_ids=stop_ids,
                             pad_id=pad_id, sampling=sampling, rng=rng, finished=finished, static=static,
                             past=past, record=record):
        for row, token in enumerate(step.tolist()):
            if reasons[row] is not None:
                continue
            if cancelled is not None and cancelled(row):
                reasons[row], finished[row] = "cancelled", True
            elif token in stop_ids:
                reasons[row] = "stop"
            else:
                tokens[row].append(token)
                steps_of[row].append(len(record or ()) - 1)
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
        results.append(Generated(tokens[row], texts[row], reasons[row] or "length",
                                 None if record is None else _row_logprobs(record, row, steps_of[row])))
    return results


def _row_logprobs(record: list, row: int, steps: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    out = []
    for s in steps:
        chosen, values, ids = record[s]
        top = [] if ids is None else list(zip(ids[row].tolist(), values[row].tolist()))
        out.append((float(chosen[row]), top))
    return out
