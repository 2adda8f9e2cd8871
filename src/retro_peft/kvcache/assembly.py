"""A decode batch's context, put together from stored states at query time.

`assemble`: one cache's rows, with one gather and one rotation for the whole batch.
`assemble_rows`: rows from several caches (rows of different domains in one pass).
Both return (the states as `StackedStates`, every layer in one tensor, and the attention mask), rows
left-padded: a static cache takes them in one copy, `hf_compat.as_cache` makes them a DynamicCache.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from retro_peft.base_model import to_device
from retro_peft.errors import InputError
from retro_peft.hf_compat import StackedStates
from retro_peft.kvcache.rotation import rotate

log = logging.getLogger(__name__)


def assemble(cache, rows: list[list[str]], device, dtype: torch.dtype | None = None):
    """One cache's rows as a KV cache: each row's segments (keys) at their positions, rows left-padded.

    Returns (StackedStates, mask [rows, width]); a row with no segments is all padding.
    """
    if cache.inv_freq is None:
        raise InputError("attach the model first (FrozenKVCache.attach(model))")
    lengths = [sum(cache.spans[k][1] for k in keys) for keys in rows]
    width = max(lengths, default=0)
    # One gather for the whole batch: slot (row, t) takes stored token index[row, t], moved by shift[row, t]
    # positions; left-padding slots take token 0 and are masked out. (numpy: a request's few thousand slots
    # cost microseconds, then one copy to the device.)
    index = np.zeros((2, len(rows), width), dtype=np.int64)  # [stored token, shift]
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, segs in enumerate(rows):
        pad, pos = width - lengths[r], 0
        for key in segs:
            start, length, computed_at = cache.spans[key]
            index[0, r, pad + pos:pad + pos + length] = np.arange(start, start + length)
            index[1, r, pad + pos:pad + pos + length] = pos - computed_at  # computed at `computed_at`, now at `pos`
            pos += length
        mask[r, pad:] = 1
    flat, shift = to_device(torch.from_numpy(index).reshape(2, -1), cache.keys.device)
    mask = to_device(mask, device)
    keys, values = gathered(cache.keys, cache.values, flat, shift, cache.inv_freq, len(rows), width)
    keys, values = (x.to(device=device, dtype=dtype or cache.keys.dtype) for x in (keys, values))
    return StackedStates(keys, values), mask


def _gathered(keys, values, flat, shift, inv_freq, rows: int, width: int):
    layers, kv_heads, _, head_dim = keys.shape
    moved = rotate(keys[:, :, flat], shift, inv_freq)
    # [layers, kv_heads, rows * width, head_dim] -> [layers, rows, kv_heads, width, head_dim]
    return tuple(x.view(layers, kv_heads, rows, width, head_dim).transpose(1, 2).contiguous()
                 for x in (moved, values[:, :, flat]))


_fused = None  # on CUDA: `_gathered` compiled into one pass over the states (None: not yet; False: failed)


def gathered(keys, values, flat, shift, inv_freq, rows: int, width: int):
    """The stored states of slots `flat` (rows * width of them), keys moved by `shift` positions, as
    [layers, rows, kv_heads, width, head_dim] each.

    On CUDA the gather, the rotation (in float32) and the layout change run as one compiled kernel: eagerly
    each is a pass over every layer's states (4.4 ms of an 8B model's 26 ms time to first token). If it
    cannot be compiled, the eager path, with one warning."""
    global _fused
    if keys.device.type == "cuda" and _fused is not False and not torch.is_grad_enabled():  # (training: eager)
        try:
            if _fused is None:
                _fused = torch.compile(_gathered, dynamic=True)
            return _fused(keys, values, flat, shift, inv_freq, rows, width)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager path computes the same
            _fused = False
            log.warning("the frozen KV cache's assembly could not be compiled (%s); assembling eagerly", error)
    return _gathered(keys, values, flat, shift, inv_freq, rows, width)


def assemble_rows(rows: list[tuple[object | None, list[str]]], device, dtype: torch.dtype | None = None):
    """A batch's context when its rows come from different caches (rows of different domains).

    rows: (cache, segment keys) per row; a row with no cache or no keys is all padding (prefilled in full).
    Each cache assembles its own rows; the parts are left-padded to one width. Returns (StackedStates, mask).
    """
    groups: dict[int, tuple[object, list[int]]] = {}
    for i, (cache, keys) in enumerate(rows):
        if cache is not None and keys:
            groups.setdefault(id(cache), (cache, []))[1].append(i)
    if len(groups) == 1 and len(next(iter(groups.values()))[1]) == len(rows):  # one cache holds every row
        cache, _ = next(iter(groups.values()))
        return assemble(cache, [keys for _, keys in rows], device, dtype)
    parts = [(members, *assemble(cache, [rows[i][1] for i in members], device, dtype))
             for cache, members in groups.values()]
    width = max((mask.shape[1] for _, _, mask in parts), default=0)
    layers, _, kv_heads, _, head_dim = parts[0][1].keys.shape
    keys = parts[0][1].keys.new_zeros((layers, len(rows), kv_heads, width, head_dim))
    values = torch.zeros_like(keys)
    mask_out = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for members, states, mask in parts:
        at = torch.tensor(members, device=keys.device)
        keys[:, at, :, width - mask.shape[1]:] = states.keys  # right-aligned: left padding, as `assemble` pads
        values[:, at, :, width - mask.shape[1]:] = states.values
        mask_out[at, width - mask.shape[1]:] = mask
    return StackedStates(keys, values), mask_out
