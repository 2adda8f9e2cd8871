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


def unwrapped(model):
    """The transformers model inside a PEFT model (any other model as it is)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_kwarg(model) -> str:
    """transformers 5.x names the KV cache argument `cache`; older versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(unwrapped(model).forward).parameters else "past_key_values"


@dataclass
class StackedStates:
    """A context's keys and values with every layer in one tensor each, [layers, batch, kv_heads, tokens, head_dim]:
    what the frozen KV cache's assembly writes in one pass. `as_cache` makes it a DynamicCache for an eager
    forward; a static cache takes it in one copy per layer (`refill_static`)."""

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


def _plain_static_layers(cache) -> list | None:
    """The layers of a transformers 5 StaticCache when every one is a plain, initialized `StaticLayer` that counts
    its filled slots in a device tensor (`cumulative_length`), so that they can be emptied and written all at
    once; None otherwise (sliding-window layers, offloading, other versions: their own reset and update)."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    ok = layers and all(type(layer) is StaticLayer and layer.is_initialized and
                        isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in layers)
    return layers if ok else None


def refill_static(cache: StaticCache, context=None) -> None:
    """Empty a static cache and write `context` (a cache or StackedStates of [batch, ..., width, ...] states, or
    None) into its first `width` slots; the prompt's states then go after them.

    A frozen KV cache's first token waits for this on the host: transformers' own `reset` and `update` cost
    five kernel launches and a Python call per layer, during which the GPU idles. On plain static layers it is
    a few calls instead (`torch._foreach_*`): every buffer zeroed, the context copied into each layer's first
    slots, every layer's filled count set to `width`. (Zeroed, not just counted as empty: a masked slot's
    value is still multiplied by its zero weight, and a stale NaN times zero is NaN.)"""
    layers = _plain_static_layers(cache)
    if layers is None:
        cache.reset()
        if context is not None:
            count = context.keys.shape[0] if isinstance(context, StackedStates) else cache_layers(context)
            for layer in range(count):
                cache.update(*layer_states(context, layer), layer)  # appended: slots 0..width
        return
    lengths = [layer.cumulative_length for layer in layers]
    # two calls, one per dtype: a list of mixed dtypes takes torch's slow path (a kernel launch per tensor,
    # 0.9 ms of host time for an 8B model's 96 tensors in a profiled run)
    torch._foreach_zero_([t for layer in layers for t in (layer.keys, layer.values)])
    torch._foreach_zero_(lengths)
    if context is None:
        return
    states = [layer_states(context, i) for i in range(len(layers))]
    width = states[0][0].shape[-2]
    torch._foreach_copy_([t[..., :width, :] for layer in layers for t in (layer.keys, layer.values)],
                         [t for pair in states for t in pair])
    torch._foreach_add_(lengths, width)


# The attention implementations `short_query_attention` switches a model to, by the `kind` it is given
DECODE_ATTENTION = {"grouped": "retro_peft_grouped_decode", "flex": "retro_peft_flex_decode"}
DECODE_KEY_CHUNK = 64  # keys per chunk of a decode step's weighted sum over values (one matmul per chunk, in parallel)
GROUPED_QUERY_TOKENS = 128  # queries up to this long attend grouped (decode steps, a frozen cache's question)


def _short_query(query, attention_mask, dropout, kwargs) -> bool:
    """Whether a short-query attention takes this call: at most `GROUPED_QUERY_TOKENS` queries, one mask for every
    head and nothing beyond plain scaled attention. Biases, soft-capping, attention sinks and per-head masks are
    left to sdpa, which implements or refuses them; so is a longer query (compute-bound: the flash kernels win)
    and one with no mask past the first token (sdpa's implicit causal mask)."""
    tokens = query.shape[2]
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))
    per_head = attention_mask is not None and attention_mask.shape[1] != 1
    implicit_causal = attention_mask is None and tokens > 1
    return not (tokens > GROUPED_QUERY_TOKENS or dropout or special or per_head or implicit_causal)


def _flex_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A short query's attention through PyTorch's `flex_attention`: compiled, its flash-decoding kernel splits the
    keys over thread blocks, reads each key/value head once for its group of query heads and reduces the parts
    in a second kernel (two kernels a layer where `_grouped_decode_attention` runs five). The mask enters as a
    score modification with the same finite floor; it must be a graph input (`StaticDecode.attention_mask`
    builds it outside the graph): inductor's flex_attention lowering refuses a mask computed inside the graph, as
    transformers' mask functions compute it. Other calls, and a mask that is not boolean, go to sdpa."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    boolean = attention_mask is not None and attention_mask.dtype == torch.bool
    if not (boolean and _short_query(query, attention_mask, dropout, kwargs)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    mask = attention_mask[:, 0, :, : key.shape[-2]]  # [batch, tokens, keys]: the same for every head
    floor = torch.finfo(torch.float32).min  # finite, as in the grouped attention: padding queries never get NaN

    def score_mod(score, b, h, q, k):
        return torch.where(mask[b, q, k], score, floor)

    out = flex_attention(query, key, value, score_mod=score_mod, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a short query (a decode step's one token, a frozen KV cache's question: at most
    `GROUPED_QUERY_TOKENS`), as a compiled step needs it; other calls go to transformers' sdpa.

    Measured on an H200 (8B shape, 2,300 cached tokens; BENCHMARKS.md), SDPA on a one-token query (cuDNN's flash
    kernel, even with the heads grouped) took 49 us a layer, against about 2 us to read that layer's keys and
    values, and 56 us on a 32-token question: it parallelises over heads and query tiles, of which a short query
    has few. Traced, transformers also repeats every key/value head for each of its query heads first (a copy of
    the cache per layer). Here the query's heads are grouped by key/value head ([batch, kv_heads, heads per kv
    head x tokens, dim]: each head's keys and values are read once), the scores and softmax are computed in
    float32 over all keys, and the weighted sum over values runs as one batched matmul per chunk of
    `DECODE_KEY_CHUNK` keys, summed after: work for every chunk in parallel, as flash-decoding splits the keys.
    Batch-1 decoding went from 156 to 171 tokens/s."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, tokens, dim = query.shape
    if not _short_query(query, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    keys, kv_heads = key.shape[-2], heads // groups
    grouped = query.reshape(batch, kv_heads, groups * tokens, dim)  # head h reads key/value head h // groups
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, :keys]  # [batch, 1, 1, tokens, keys]: the same for every head
        scores = scores.view(batch, kv_heads, groups, tokens, keys)
        # a finite floor, not -inf: a padding query that sees no key gets finite (unused) states, never NaN that
        # later queries would multiply by their zero weights
        scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask).view(batch, kv_heads, groups * tokens, keys)
    weights = scores.softmax(dim=-1).to(value.dtype)
    chunk = DECODE_KEY_CHUNK if keys % DECODE_KEY_CHUNK == 0 else keys
    parts = torch.matmul(weights.unflatten(-1, (keys // chunk, chunk)).transpose(2, 3),
                         value.unflatten(2, (keys // chunk, chunk)))  # [batch, kv_heads, chunks, groups x tokens, dim]
    out = parts.sum(dim=2, dtype=torch.float32).to(value.dtype)
    return out.reshape(batch, heads, tokens, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def short_query_attention(model, kind: str = "grouped"):
    """The model's sdpa attention replaced inside the block by a short-query attention (`kind`: "grouped",
    `_grouped_decode_attention`; "flex", `_flex_decode_attention`); a model on another implementation is left as
    it is. Entered around each call of a compiled step, so that its guards see the same implementation at every
    replay. Another thread's forward meanwhile runs through it too, which changes nothing it computes: short
    queries get the same attention (to rounding), longer ones go to sdpa as before. (`StaticDecode` checks
    `kind` when it is built.)"""
    config = model.config
    if TRANSFORMERS_MAJOR < 5 or config._attn_implementation != "sdpa":
        yield
        return
    _register_decode_attention()
    config._attn_implementation = DECODE_ATTENTION[kind]
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@functools.cache
def _register_decode_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    for kind, function in (("grouped", _grouped_decode_attention), ("flex", _flex_decode_attention)):
        AttentionInterface.register(DECODE_ATTENTION[kind], function)
        AttentionMaskInterface.register(DECODE_ATTENTION[kind], sdpa_mask)


# Linear layers of one module that read the same input, in the order its forward calls them
SIBLING_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Siblings:
    """Sibling linear layers (a layer's q/k/v projections, its MLP's gate and up) as one matmul.

    A batch-1 decode step reads every weight once per token, and a small matmul reads it slower than a large one:
    measured on an H200 (8B shape), the 8 MiB k and v projections alone read at 1.35 TB/s and q at 3.1, against
    3.57 TB/s for the three as one 48 MiB matrix (gate and up: 3.78-3.87 apart, 4.09 together). The weights are
    concatenated once into one matrix and each layer's own weight becomes a view of its rows, so no memory is
    added and every other path (training, eager decoding) reads the same numbers. Inside `fused_siblings`, the
    first sibling called computes all of them and leaves the result for the others, which take their part of it
    only when called with that same input tensor; any other call computes its own product. The hand-over is read
    in one step, so another thread's forward at worst computes its own products, never takes another's."""

    def __init__(self, linears: list):
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self.stash = None  # (input, its products split per sibling), from the first sibling to the last
        self.forwards = [functools.partial(_sibling_forward, self, i) for i in range(len(linears))]
        self.fuse()

    def fuse(self) -> None:
        with torch.inference_mode(False), torch.no_grad():  # ordinary weights, even when first fused in inference
            weight = torch.cat([linear.weight.detach() for linear in self.linears])
            self.bias = (torch.cat([linear.bias.detach() for linear in self.linears])
                         if self.linears[0].bias is not None else None)
            for linear, rows in zip(self.linears, weight.split(self.sizes)):
                linear.weight = torch.nn.Parameter(rows, requires_grad=linear.weight.requires_grad)
        self.weight = weight
        self.addresses = [linear.weight.data_ptr() for linear in self.linears]

    def intact(self) -> bool:
        """Whether every sibling's weight is still its view of the fused matrix (an in-place change, as PEFT's
        merge makes, is seen through the view; a weight replaced by another tensor is not)."""
        return all(linear.weight.data_ptr() == address for linear, address in zip(self.linears, self.addresses))


def _sibling_forward(group: _Siblings, index: int, x, *args, **kwargs):
    if index == 0:
        parts = torch.nn.functional.linear(x, group.weight, group.bias).split(group.sizes, dim=-1)
        group.stash = (x, parts)
        return parts[0]
    stash = group.stash  # read once: another thread's hand-over is seen whole or not at all
    if stash is not None and stash[0] is x:
        if index == len(group.sizes) - 1:
            group.stash = None
        return stash[1][index]
    linear = group.linears[index]
    return torch.nn.functional.linear(x, linear.weight, linear.bias)


def _plain_linear(module):
    """The nn.Linear computing `module`'s base product (inside a PEFT layer, its base layer); None for anything
    else (a quantized layer, one with hooks that move its weights, meta weights)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if type(module) is not torch.nn.Linear or getattr(module, "_hf_hook", None) is not None:
        return None
    return None if module.weight.is_meta else module


def sibling_groups(model) -> list[_Siblings]:
    """The model's sibling linear layers (`SIBLING_LINEARS`), fused once (kept on the model: later calls return
    the same groups). Siblings of different dtypes, devices or input sizes are left apart."""
    groups = getattr(model, "_retro_siblings", None)
    if groups is None:
        groups = []
        for module in model.modules():
            for names in SIBLING_LINEARS:
                linears = [_plain_linear(getattr(module, name, None)) for name in names]
                if any(linear is None for linear in linears):
                    continue
                first = linears[0]
                if all(linear.in_features == first.in_features and linear.weight.dtype == first.weight.dtype
                       and linear.weight.device == first.weight.device
                       and (linear.bias is None) == (first.bias is None) for linear in linears):
                    groups.append(_Siblings(linears))
        model.__dict__["_retro_siblings"] = groups  # not a submodule or parameter: invisible to state_dict
    return groups


@contextlib.contextmanager
def fused_siblings(groups: list[_Siblings]):
    """Inside the block, each group's siblings compute their products as one matmul (`_Siblings`). A group whose
    weights were replaced since it was fused is fused again first. Entered around each call of a compiled step,
    as `short_query_attention` is."""
    for group in groups:
        if not group.intact():
            group.fuse()
        for linear, forward in zip(group.linears, group.forwards):
            linear.forward = forward
    try:
        yield
    finally:
        for group in groups:
            group.stash = None
            for linear in group.linears:
                linear.__dict__.pop("forward", None)
