"""What differs between the transformers versions retro-peft runs on, in one place.

The KV cache's argument name, where a cache keeps each layer's states, and how a
`StaticCache` is built changed between transformers 4.x and 5.x; every module that
touches a cache goes through these.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from transformers import DynamicCache, StaticCache

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def cache_kwarg(model) -> str:
    """transformers 5.x names the KV cache argument `cache`; older versions `past_key_values`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def layer_states(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a cache: [batch, kv_heads, tokens, head_dim] each."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def cache_layers(cache) -> int:
    return len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)


def dynamic_cache(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A DynamicCache holding these states, one (keys, values) pair per layer."""
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache


def static_cache(config, *, batch: int, length: int, device, dtype) -> StaticCache:
    # transformers 5 sizes the buffers at the first update; 4.x needs batch, device and dtype up front
    return StaticCache(config=config, max_cache_len=length, max_batch_size=batch, device=device, dtype=dtype)
