"""Selective recompute over an assembled context (the `blend` layout, in the style of EPIC and CacheBlend).

In the block layout every stored passage was computed as if it were the first: it never
attended to the passages before it, and its first tokens act as a second attention sink.
Recomputing a few tokens of each later passage, attending to everything before them,
restores most of the cross-passage attention at a small share of a full prefill's cost
(EPIC recomputes each chunk's first tokens; CacheBlend the tokens whose states deviate
most). Here: the first `recompute_tokens` tokens of every segment after the first passage
(its marker "\\n[n]" and the start of its body).

The recomputed tokens run through the model in one pass on top of the assembled context,
each attending to the context slots before its position (not to the stored, stale state of
any recomputed token) and to the recomputed tokens before it, through a custom 4-D mask.
Their fresh states are appended after the context and the stale slots are masked out:
attention does not depend on slot order once keys carry their rotary position, so nothing is
moved. With every token after the first passage recomputed, the context is exactly a full
prefill's (a test checks the logits).

The `deviation` layout picks the tokens as CacheBlend does instead: the whole context's keys and values at
`DEVIATION_LAYER` are computed as a full prefill would (the first two layers over every token, a small share
of a full prefill), and in each later passage the `recompute_ratio` share of tokens whose states differ most
from the stored ones is recomputed through every layer (`deviating`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import DynamicCache

from retro_peft.errors import InputError
from retro_peft.hf_compat import cache_kwarg, layer_states, unwrapped
from retro_peft.kvcache.layout import HEAD

# Per later passage: EPIC's order of magnitude (a few initial tokens). Not tuned: the sweep in BENCHMARKS.md
# ("Selective recompute") found no M below 64 that changes SQuAD F1 with SmolLM2.
DEFAULT_RECOMPUTE_TOKENS = 16
EXACT_SEGMENTS = 3  # head, "[1]", the first passage: stored exactly as a full prefill computes them
# The deviation layout: CacheBlend's operating point (it reports full-prefill quality at ~15% recomputed).
DEFAULT_RECOMPUTE_RATIO = 0.15
# Layer 0's keys and values are each token's own (no attention has mixed the passages yet): layer 1 is the first
# whose stored states can differ from a full prefill's, and the earliest (cheapest) one to compare (CacheBlend).
DEVIATION_LAYER = 1


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio <= 1.0:
        raise InputError(f"recompute_ratio is a share of tokens between 0 and 1, got {ratio}")
    return ratio


def recompute_slots(cache, keys: list[str], first_slot: int, tokens: int | None) -> list[tuple[int, int]]:
    """(slot, token id) of a row's tokens to recompute: the first `tokens` (None: all) of each segment after the
    first passage. first_slot: where the row's first segment sits in the assembled context."""
    out, slot = [], first_slot
    for i, key in enumerate(keys):
        length = cache.spans[key][1]
        if i >= EXACT_SEGMENTS and key != HEAD:
            ids = cache.token_ids[key]
            out += [(slot + t, ids[t]) for t in range(length if tokens is None else min(tokens, length))]
        slot += length
    return out


def context_ids(rows: list[tuple[object | None, list[str]]], width: int, device) -> torch.Tensor:
    """[rows, width]: the token id in each slot of the assembled context (left-padded with 0 under a 0 mask)."""
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (cache, keys) in enumerate(rows):
        row = [t for key in keys for t in cache.token_ids[key]] if cache is not None else []
        if row:
            ids[r, width - len(row):] = torch.tensor(row)
    return ids.to(device)


@contextlib.contextmanager
def first_layers(model, n: int):
    """Within the context the model runs its first `n` decoder layers only (then its final norm and head). The
    server's one decode thread is the model's only user while it runs."""
    decoder = unwrapped(model).get_decoder()
    layers = decoder.layers
    decoder.layers = layers[:n]
    try:
        yield
    finally:
        decoder.layers = layers


@torch.inference_mode()
def deviating(model, past, mask: torch.Tensor, ids: torch.Tensor, candidates: list[list[tuple[int, int]]],
              ratios: list[float | None]) -> list[list[tuple[int, int]]]:
    """Per row with a ratio, the `ratio` share of its candidate (slot, token id)s whose keys and values at
    `DEVIATION_LAYER`, computed as a full prefill of the row's context computes them, differ most (squared
    distance) from the assembled ones in `past`; a row without one keeps its candidates."""
    if not any(r is not None and c for r, c in zip(ratios, candidates)):
        return candidates
    fresh = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with first_layers(model, DEVIATION_LAYER + 1):
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
              **{cache_kwarg(model): fresh})
    (fresh_k, fresh_v), (old_k, old_v) = layer_states(fresh, DEVIATION_LAYER), layer_states(past, DEVIATION_LAYER)
    deviation = ((fresh_k.float() - old_k.float()) ** 2).sum((1, 3)) + ((fresh_v.float() - old_v.float()) ** 2).sum((1, 3))
    chosen = []
    for r, (row, ratio) in enumerate(zip(candidates, ratios)):
        if ratio is None or not row:
            chosen.append(row)
            continue
        slots = torch.tensor([s for s, _ in row], device=deviation.device)
        top = deviation[r, slots].topk(math.ceil(ratio * len(row))).indices.sort().values
        chosen.append([row[i] for i in top.tolist()])
    return chosen


@torch.inference_mode()
def recompute(model, past, mask: torch.Tensor, selected: list[list[tuple[int, int]]],
              tails: list[list[int]] | None = None):
    """Recompute the `selected` (slot, token id) of each row over the assembled context (`past`, `mask`
    [rows, width], left-padded). tails: each row's tokens after its context (the question): all but the last
    run in the same pass, after the recomputed tokens and attending to them, so that the decode loop's prefill
    is one token instead of a second pass through every layer. Returns (past with the fresh states appended,
    the new mask, what is left of the tails for the decode loop to prefill)."""
    rows, width = mask.shape
    n = max((len(s) for s in selected), default=0)
    if n == 0:
        return past, mask, tails
    lead = [t[:-1] for t in tails] if tails is not None else [[] for _ in range(rows)]
    m = max(len(t) for t in lead)
    device = mask.device
    dtype = next(model.parameters()).dtype
    context_pos = (mask.cumsum(-1) - 1).clamp(min=0)  # each slot's position in its row
    ids = torch.zeros((rows, n + m), dtype=torch.long, device=device)
    pos = torch.zeros((rows, n + m), dtype=torch.long, device=device)
    valid = torch.zeros((rows, n + m), dtype=torch.bool, device=device)  # fresh tokens, then the tails (left-padded)
    stale = torch.zeros((rows, width), dtype=torch.bool, device=device)
    for r, chosen in enumerate(selected):
        if chosen:
            slots = torch.tensor([s for s, _ in chosen], device=device)
            ids[r, :len(chosen)] = torch.tensor([t for _, t in chosen], device=device)
            pos[r, :len(chosen)] = context_pos[r, slots]
            valid[r, :len(chosen)] = True
            stale[r, slots] = True
        if lead[r]:
            ids[r, n + m - len(lead[r]):] = torch.tensor(lead[r], device=device)
            # the tail comes after every context token (a recomputed one replaces its stale slot: the count holds)
            pos[r, n + m - len(lead[r]):] = mask[r].sum() + torch.arange(len(lead[r]), device=device)
            valid[r, n + m - len(lead[r]):] = True
    live = mask.bool() & ~stale
    fresh, tail = torch.arange(n + m, device=device) < n, torch.arange(n + m, device=device) >= n
    # A recomputed token (position p) sees the live context slots before p and the recomputed tokens up to p; a
    # tail token sees all the live context, every recomputed token and the tail up to itself.
    sees_context = live[:, None, :] & ((context_pos[:, None, :] < pos[:, :, None]) | tail[None, :, None])
    sees_new = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None]) & (fresh[None, None, :] | tail[None, :, None])
    own = torch.eye(n + m, dtype=torch.bool, device=device)[None]  # a padding query sees itself: no empty row (NaN)
    allowed = torch.cat([sees_context, sees_new | own], dim=-1)[:, None]  # [rows, 1, n + m, width + n + m]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    model(input_ids=ids, position_ids=pos, attention_mask=additive, use_cache=True, logits_to_keep=1,
          **{cache_kwarg(model): past})
    new_mask = torch.cat([mask * (~stale).long(), valid.long()], dim=1)
    return past, new_mask, None if tails is None else [t[-1:] for t in tails]
