"""A decode batch's context, put together from stored states at query time.

`assemble`: one cache's rows, with one gather and one rotation for the whole batch.
`assemble_rows`: rows from several caches (rows of different domains in one pass).
Both return (a DynamicCache, its attention mask), rows left-padded.
"""

from __future__ import annotations

import torch

from retro_peft.errors import InputError
from retro_peft.hf_compat import cache_layers, dynamic_cache, layer_states
from retro_peft.kvcache.rotation import rotate


def assemble(cache, rows: list[list[str]], device, dtype: torch.dtype | None = None):
    """One cache's rows as a KV cache: each row's segments (keys) at their positions, rows left-padded.

    Returns (cache, mask [rows, width]); a row with no segments is all padding.
    """
    if cache.inv_freq is None:
        raise InputError("attach the model first (FrozenKVCache.attach(model))")
    lengths = [sum(cache.spans[k][1] for k in keys) for keys in rows]
    width = max(lengths, default=0)
    # One gather for the whole batch: slot (row, t) takes stored token index[row, t], moved by shift[row, t]
    # positions; left-padding slots take token 0 and are masked out.
    index = torch.zeros((len(rows), width), dtype=torch.long)
    shift = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, segs in enumerate(rows):
        pad, pos = width - lengths[r], 0
        for key in segs:
            start, length, computed_at = cache.spans[key]
            index[r, pad + pos:pad + pos + length] = torch.arange(start, start + length)
            shift[r, pad + pos:pad + pos + length] = pos - computed_at  # computed at `computed_at`, now at `pos`
            pos += length
        mask[r, pad:] = 1
    layers, kv_heads, _, head_dim = cache.keys.shape
    flat = index.reshape(-1).to(cache.keys.device)
    keys = rotate(cache.keys[:, :, flat], shift.reshape(-1).to(cache.keys.device), cache.inv_freq)
    values = cache.values[:, :, flat]
    # [layers, kv_heads, rows * width, head_dim] -> [layers, rows, kv_heads, width, head_dim]
    keys, values = (x.view(layers, kv_heads, len(rows), width, head_dim).transpose(1, 2)
                    .to(device=device, dtype=dtype or cache.keys.dtype).contiguous() for x in (keys, values))
    mask = mask.to(device)
    return dynamic_cache(list(keys.unbind(0)), list(values.unbind(0))), mask


def assemble_rows(rows: list[tuple[object | None, list[str]]], device, dtype: torch.dtype | None = None):
    """A batch's context when its rows come from different caches (rows of different domains).

    rows: (cache, segment keys) per row; a row with no cache or no keys is all padding (prefilled in full).
    Each cache assembles its own rows; the parts are left-padded to one width. Returns (cache, mask).
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
    first = parts[0][1]
    layers = cache_layers(first)
    keys_out, values_out = [], []
    mask_out = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for layer in range(layers):
        k0, _ = layer_states(first, layer)
        k_full = k0.new_zeros((len(rows), k0.shape[1], width, k0.shape[3]))
        v_full = torch.zeros_like(k_full)
        for members, past, mask in parts:
            k, v = layer_states(past, layer)
            at = torch.tensor(members, device=k.device)
            k_full[at, :, width - k.shape[2]:] = k  # right-aligned: left padding, as `assemble` pads
            v_full[at, :, width - v.shape[2]:] = v
            if layer == 0:
                mask_out[at, width - mask.shape[1]:] = mask
        keys_out.append(k_full)
        values_out.append(v_full)
    return dynamic_cache(keys_out, values_out), mask_out
