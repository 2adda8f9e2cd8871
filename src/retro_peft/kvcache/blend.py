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
"""

from __future__ import annotations

import torch

from retro_peft.hf_compat import cache_kwarg
from retro_peft.kvcache.layout import HEAD

# Per later passage: EPIC's order of magnitude (a few initial tokens). Not tuned: the sweep in BENCHMARKS.md
# ("Selective recompute") found no M below 64 that changes SQuAD F1 with SmolLM2.
DEFAULT_RECOMPUTE_TOKENS = 16
EXACT_SEGMENTS = 3  # head, "[1]", the first passage: stored exactly as a full prefill computes them


def recompute_slots(cache, keys: list[str], first_slot: int, tokens: int) -> list[tuple[int, int]]:
    """(slot, token id) of a row's tokens to recompute: the first `tokens` of each segment after the first
    passage. first_slot: where the row's first segment sits in the assembled context."""
    out, slot = [], first_slot
    for i, key in enumerate(keys):
        length = cache.spans[key][1]
        if i >= EXACT_SEGMENTS and key != HEAD:
            ids = cache.token_ids[key]
            out += [(slot + t, ids[t]) for t in range(min(tokens, length))]
        slot += length
    return out


@torch.inference_mode()
def recompute(model, past, mask: torch.Tensor, selected: list[list[tuple[int, int]]]):
    """Recompute the `selected` (slot, token id) of each row over the assembled context (`past`, `mask`
    [rows, width], left-padded). Returns (past with the fresh states appended, the new mask)."""
    rows, width = mask.shape
    n = max((len(s) for s in selected), default=0)
    if n == 0:
        return past, mask
    device = mask.device
    dtype = next(model.parameters()).dtype
    context_pos = (mask.cumsum(-1) - 1).clamp(min=0)  # each slot's position in its row
    ids = torch.zeros((rows, n), dtype=torch.long, device=device)
    pos = torch.zeros((rows, n), dtype=torch.long, device=device)
    valid = torch.zeros((rows, n), dtype=torch.bool, device=device)
    stale = torch.zeros((rows, width), dtype=torch.bool, device=device)
    for r, chosen in enumerate(selected):
        if chosen:
            slots = torch.tensor([s for s, _ in chosen], device=device)
            ids[r, :len(chosen)] = torch.tensor([t for _, t in chosen], device=device)
            pos[r, :len(chosen)] = context_pos[r, slots]
            valid[r, :len(chosen)] = True
            stale[r, slots] = True
    # query i (position p_i) sees: live context slots before p_i, and recomputed tokens up to itself
    sees_context = (mask.bool() & ~stale)[:, None, :] & (context_pos[:, None, :] < pos[:, :, None])
    sees_fresh = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
    own = torch.eye(n, dtype=torch.bool, device=device)[None]  # a padding query sees itself: no empty row (NaN)
    allowed = torch.cat([sees_context, sees_fresh | own], dim=-1)[:, None]  # [rows, 1, n, width + n]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    model(input_ids=ids, position_ids=pos, attention_mask=additive, use_cache=True, logits_to_keep=1,
          **{cache_kwarg(model): past})
    new_mask = torch.cat([mask * (~stale).long(), valid.long()], dim=1)
    return past, new_mask
