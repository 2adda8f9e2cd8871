"""What differs between the transformers versions retro-peft runs on, in one place.

The KV cache's argument name, where a cache keeps each layer's states, and how a
`StaticCache` is built changed between transformers 4.x and 5.x; every module that
touches a cache goes through these.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache, StaticCache

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def cache_kwarg(model) -> str:
    """transformers 5.x names the KV cache argument `cache`; older versions `past_key_values`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@dataclass
class StackedStates:
    """A context's keys and values with every layer in one tensor each, [layers, batch, kv_heads, tokens, head_dim]:
    what the frozen KV cache's assembly writes in one pass. `as_cache` makes it a DynamicCache for an eager
    forward; a stacked static cache takes it in one copy (`write_context`)."""

    keys: torch.Tensor
    values: torch.Tensor


def as_cache(past):
    """What a model's forward takes as its cache: StackedStates as a DynamicCache, any other cache as it is."""
    if isinstance(past, StackedStates):
        return dynamic_cache(list(past.keys.unbind(0)), list(past.values.unbind(0)))
    return past


def layer_states(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a cache: [batch, kv_heads, tokens, head_dim] each."""
    if isinstance(cache, StackedStates):
        return cache.keys[layer], cache.values[layer]
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def cache_layers(cache) -> int:
    return len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)


if TRANSFORMERS_MAJOR >= 5:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose decode steps write into spare room instead of concatenating.

        transformers' layer concatenates at every update: each decoded token copies the whole cache, layer by
        layer (on the CPU, a quarter of a SmolLM2 decode step at batch 8 x 700 tokens). This one keeps a buffer
        with room for a quarter more tokens (at least 64), writes each update into it, and exposes the filled
        part as `keys` / `values` (views); it reallocates only when the room runs out. The first update adopts
        its tensors as they are (no copy), so a cache rebuilt from states costs what it did. Anything that sets
        `keys` / `values` itself (crop, reorder, batch selection) is adopted at the next update.
        """

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._buffers = self._views = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self._views is None or self.keys is not self._views[0]:  # first update, or states set from outside
                if self.keys.numel() == 0:  # adopted as they are: full, so the next update reallocates first
                    self.keys, self.values = key_states, value_states
                    self._buffers = self._views = (self.keys, self.values)
                    return self.keys, self.values
                self._buffers = (self.keys, self.values)
            filled, new = self.keys.shape[-2], key_states.shape[-2]
            if filled + new > self._buffers[0].shape[-2]:
                room = filled + new + max(64, (filled + new) // 4)
                grown = []
                for old, fresh in zip((self.keys, self.values), (key_states, value_states)):
                    buffer = fresh.new_empty((*fresh.shape[:-2], room, fresh.shape[-1]))
                    buffer[..., :filled, :] = old
                    grown.append(buffer)
                self._buffers = tuple(grown)
            keys, values = self._buffers
            keys[..., filled:filled + new, :] = key_states
            values[..., filled:filled + new, :] = value_states
            self.keys, self.values = keys[..., :filled + new, :], values[..., :filled + new, :]
            self._views = (self.keys, self.values)
            return self.keys, self.values

        def reset(self) -> None:
            super().reset()
            self._buffers = self._views = None


def dynamic_cache(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A decoding cache holding these states, one (keys, values) pair per layer (none: empty). On transformers 5
    its layers grow in place (`GrowingLayer`) instead of concatenating at every step."""
    cache = DynamicCache()
    if TRANSFORMERS_MAJOR >= 5:
        cache.layer_class_to_replicate = GrowingLayer
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache


def static_cache(config, *, batch: int, length: int, device, dtype) -> StaticCache:
    # transformers 5 sizes the buffers at the first update; 4.x needs batch, device and dtype up front
    # (Each layer keeps buffers of its own. Views of two stacked tensors, written in one copy, were tried: the
    # aliased inputs kept the compiled steps from replaying as CUDA graphs, and 8B decoding ran 2x slower.)
    return StaticCache(config=config, max_cache_len=length, max_batch_size=batch, device=device, dtype=dtype)


def write_context(cache: StaticCache, context) -> None:
    """Write `context` (a cache or StackedStates of [batch, ..., width, ...] states) into the first `width` slots of
    an emptied static cache; the prompt's states then go after them."""
    layers = context.keys.shape[0] if isinstance(context, StackedStates) else cache_layers(context)
    for layer in range(layers):
        cache.update(*layer_states(context, layer), layer)  # appended: slots 0..width


GROUPED_DECODE = "retro_peft_grouped_decode"  # the attention implementation `grouped_decode` switches a model to
DECODE_KEY_CHUNK = 64  # keys per chunk of a decode step's weighted sum over values (one matmul per chunk, in parallel)


def _grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a one-token query, as a compiled decode step needs it; other calls go to transformers' sdpa.

    Measured on an H200 (8B shape, 2,300 cached tokens; BENCHMARKS.md), SDPA on a one-token query (cuDNN's flash
    kernel, even with the heads grouped) took 49 us a layer, against about 2 us to read that layer's keys and
    values: it parallelises over heads and query tiles, of which a one-token query has few. Traced, transformers
    also repeats every key/value head for each of its query heads first (a copy of the cache per layer). Here the
    query's heads are grouped by key/value head ([batch, kv_heads, heads per kv head, dim]: each head's keys and
    values are read once), the scores and softmax are computed in float32 over all keys, and the weighted sum
    over values runs as one batched matmul per chunk of `DECODE_KEY_CHUNK` keys, summed after: work for every
    chunk in parallel, as flash-decoding splits the keys. Batch-1 decoding went from 156 to 171 tokens/s."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    # anything beyond plain scaled attention with one mask for every head (biases, soft-capping, attention sinks,
    # per-head masks) is left to sdpa, which implements or refuses it
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))
    per_head = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or dropout or special or per_head:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    keys = key.shape[-2]
    grouped = query.reshape(batch, heads // groups, groups, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :keys]  # [batch, 1, 1, keys]: the same for every head
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1).to(value.dtype)
    chunk = DECODE_KEY_CHUNK if keys % DECODE_KEY_CHUNK == 0 else keys
    parts = torch.matmul(weights.unflatten(-1, (keys // chunk, chunk)).transpose(2, 3),
                         value.unflatten(2, (keys // chunk, chunk)))  # [batch, kv_heads, chunks, groups, dim]
    out = parts.sum(dim=2, dtype=torch.float32).to(value.dtype)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def grouped_decode(model):
    """The model's sdpa attention replaced by `_grouped_decode_attention` inside the block (a model on another
    implementation is left as it is). Entered around each call of a compiled step, so that its guards see the
    same implementation at every replay. Another thread's forward meanwhile runs through it too, which changes
    nothing it computes: one-token queries get the same attention, longer ones go to sdpa as before."""
    config = model.config
    if TRANSFORMERS_MAJOR < 5 or config._attn_implementation != "sdpa":
        yield
        return
    _register_grouped_decode()
    config._attn_implementation = GROUPED_DECODE
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@functools.cache
def _register_grouped_decode() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_DECODE, _grouped_decode_attention)
    AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)
