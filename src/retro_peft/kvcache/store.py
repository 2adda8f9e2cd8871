"""The frozen KV cache itself: the stored states, how they are computed, saved, loaded and checked.

Block attention, not the full prompt's attention: a passage attends to the head
and "[1]", not to the passages before it. With one passage the two are the same
computation (a test checks it); with several, answers can differ from a full
prefill (measured in BENCHMARKS.md). Passages are kept whole (a passage that
does not fit the token budget is dropped, not cut). An adapter can be trained in
this layout (`RetrievalConfig.block_attention`: the trainer computes the passages
with `segment_states` and assembles them with `assemble`, as serving does).

Supported: rotary (rotate-half) models with full attention, Llama-style (the
packaged SmolLM2 is a Llama). A cache read from its file is memory-mapped
(safetensors), so its pages are read as queries touch them and shared between
processes; a cache built in this process is held in memory (SmolLM2 in fp32: 46 KB
per token, 1.13 GB for the 194 chunks of the SQuAD benchmark index). The states belong to one base model, adapter,
index and template (and soft tokens, `kvcache.soft`, if the domain has them): the file records their
fingerprints and `load` refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import DynamicCache

from retro_peft.choices import DEFAULT_KV_LAYOUT, check_kv_layout
from retro_peft.errors import InputError
from retro_peft.progress import bar as progress_bar
from retro_peft.generation.prompt import Passage, encode, passage_body
from retro_peft.hf_compat import as_cache, cache_kwarg, dynamic_cache, layer_states
from retro_peft.kvcache.assembly import assemble, assemble_rows
from retro_peft.kvcache.blend import (DEFAULT_RECOMPUTE_RATIO, DEFAULT_RECOMPUTE_TOKENS, check_ratio,
                                      context_ids, deviating, recompute, recompute_slots)
from retro_peft.kvcache.layout import (HEAD, CachedPrompt, body_digest, cached_prompts, chunk_key, is_chunk,
                                       marker_key, template_fingerprint, template_segments)
from retro_peft.kvcache.rotation import rotary_embedding
from retro_peft.kvcache.soft import SoftTokens
from retro_peft.base_model import check_fingerprint, model_dtype, weights_fingerprint
from retro_peft.storage import atomic_write_with

FORMAT = "retro-peft-kvcache"
FORMAT_VERSION = 1


def index_fingerprint(index) -> str:
    """The chunks (ids and texts) the states were computed from; any change to the index changes it."""
    h = hashlib.sha256()
    for chunk in index.chunks():
        h.update(f"{chunk.id}\0{chunk.text}\0{(chunk.metadata or {}).get('title', '')}\0".encode())
    return h.hexdigest()


def segment_states(model, head_ids: list[int], segments: dict[str, list[int]], *,
                   lead: dict[str, list[int]] | None = None, batch_size: int = 8, progress: bool = False,
                   soft: SoftTokens | None = None):
    """Key/value states of the head, then of each segment computed after the head and its `lead` tokens.

    soft: appended after every passage body (`layout.is_chunk`), their states stored with it (its span is
    then `soft.count` longer than its token ids). Returns (keys, values, spans, token_ids) as
    `FrozenKVCache` holds them, on the model's device. Runs under whatever grad mode the caller is in: the
    cache builds under inference mode, block-attention training (`training.trainer.block_attention_forward`)
    with gradients through every segment (and the soft tokens).
    """
    rotary_embedding(model)
    if not head_ids:
        raise InputError("the frozen KV cache needs a non-empty head")
    lead = lead or {}
    empty = [k for k, ids in segments.items() if not ids]
    if empty:
        raise InputError(f"segment {empty[0]!r} has no tokens")
    device = next(model.parameters()).device
    cache_kw = cache_kwarg(model)
    head_cache = DynamicCache()
    model(input_ids=torch.tensor([head_ids], device=device), use_cache=True, logits_to_keep=1,
          **{cache_kw: head_cache})
    layers = model.config.num_hidden_layers
    head_states = [layer_states(head_cache, i) for i in range(layers)]
    n = len(head_ids)
    parts_k = [torch.stack([k[0] for k, _ in head_states])]  # [layers, kv_heads, n, head_dim]
    parts_v = [torch.stack([v[0] for _, v in head_states])]
    spans, token_ids, start = {HEAD: (0, n, 0)}, {HEAD: list(head_ids)}, n
    if soft is not None:
        soft.check_model(model)
    # batches of similar lengths carry little padding (the stored order does not matter: spans say where)
    items = sorted(segments.items(), key=lambda item: len(lead.get(item[0], [])) + len(item[1]))
    bar = progress_bar(progress=progress, desc="kv cache", total=len(items), unit="passage")
    for first in range(0, len(items), batch_size):
        group = items[first:first + batch_size]
        inputs = [lead.get(key, []) + seg for key, seg in group]
        extra = [soft.count if soft is not None and is_chunk(key) else 0 for key, _ in group]
        width = max(len(x) + e for x, e in zip(inputs, extra))
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), n + width), dtype=torch.long)
        mask[:, :n] = 1
        for row, x in enumerate(inputs):  # right padding: real tokens never see it (causal)
            ids[row, :len(x)] = torch.tensor(x)
            mask[row, n:n + len(x) + extra[row]] = 1
        past = dynamic_cache([k.expand(len(group), -1, -1, -1).contiguous() for k, _ in head_states],
                          [v.expand(len(group), -1, -1, -1).contiguous() for _, v in head_states])
        positions = torch.arange(n, n + width, device=device).expand(len(group), -1)
        tokens = {"input_ids": ids.to(device)}
        if any(extra):  # the soft tokens' embeddings right after each passage's own tokens
            embeds = model.get_input_embeddings()(tokens.pop("input_ids"))
            trailer = soft.inputs(embeds.dtype, device)
            embeds = torch.stack([torch.cat([e[:len(x)], trailer, e[len(x) + soft.count:]]) if k else e
                                  for e, x, k in zip(embeds, inputs, extra)])
            tokens = {"inputs_embeds": embeds}
        model(**tokens, attention_mask=mask.to(device), position_ids=positions,
              use_cache=True, logits_to_keep=1, **{cache_kw: past})
        states = [layer_states(past, i) for i in range(layers)]
        k_all = torch.stack([k[:, :, n:] for k, _ in states], dim=1)  # [rows, layers, kv_heads, width, d]
        v_all = torch.stack([v[:, :, n:] for _, v in states], dim=1)
        for row, (key, seg) in enumerate(group):
            skip, stored = len(lead.get(key, [])), len(seg) + extra[row]
            parts_k.append(k_all[row, :, :, skip:skip + stored])
            parts_v.append(v_all[row, :, :, skip:skip + stored])
            spans[key] = (start, stored, n + skip)
            token_ids[key] = list(seg)
            start += stored
        bar.update(len(group))
    bar.close()
    return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2), spans, token_ids


class FrozenKVCache:
    """Stored key/value states of a head, passage markers and passage bodies (see the module docstring).

    keys, values: [layers, kv_heads, tokens, head_dim], every segment's tokens one after another;
    spans: {segment key: (start, length, position it was computed at)}.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spans: dict[str, tuple[int, int, int]],
                 token_ids: dict[str, list[int]], meta: dict, digests: dict[str, str] | None = None,
                 layout: str = DEFAULT_KV_LAYOUT):
        self.keys, self.values, self.spans, self.token_ids, self.meta = keys, values, spans, token_ids, meta
        self.digests = digests or {}  # chunk segment -> digest of the passage text its states were computed from
        self.layout = check_kv_layout(layout)  # see choices.KVLayout
        if self.meta.get("soft_tokens") and self.layout != "block":
            # the stored passages end in soft tokens no full prompt holds: the prefix layout's first passage
            # would not be the prompt's, and a recompute has no token ids for them
            raise InputError(f"this frozen KV cache stores soft tokens after each passage: it answers in the "
                             f"block layout only, not {self.layout!r}")
        self.recompute_tokens = DEFAULT_RECOMPUTE_TOKENS  # the blend layout: tokens recomputed per later passage
        self.recompute_ratio = DEFAULT_RECOMPUTE_RATIO  # the deviation layout: share of later passages' tokens
        self.inv_freq = None  # the model's rotary frequencies, on its device (`attach`)

    # -- building ---------------------------------------------------------------------------------------------

    @classmethod
    @torch.inference_mode()
    def from_segments(cls, model, head_ids: list[int], segments: dict[str, list[int]], *,
                      lead: dict[str, list[int]] | None = None, batch_size: int = 8, meta: dict | None = None,
                      progress: bool = False, soft: SoftTokens | None = None) -> FrozenKVCache:
        """Compute the states of `head_ids`, then of every segment after the head and its `lead` tokens
        (lead[key], default none: what the segment sees between the head and itself; not stored), and the
        soft tokens after each passage body, if any (`kvcache.soft`)."""
        was_training = model.training
        model.eval()
        try:
            keys, values, spans, token_ids = segment_states(model, head_ids, segments, lead=lead,
                                                            batch_size=batch_size, progress=progress, soft=soft)
        finally:
            model.train(was_training)
        meta = dict(meta or {}, weights=weights_fingerprint(model), dtype=str(keys.dtype).replace("torch.", ""),
                    soft_tokens=soft.fingerprint() if soft is not None else None)
        return cls(keys.cpu(), values.cpu(), spans, token_ids, meta)

    @classmethod
    def build(cls, model, tokenizer, index, retrieval, *, batch_size: int = 8, progress: bool = False,
              chunk_ids: set[str] | None = None, soft: SoftTokens | None = None) -> FrozenKVCache:
        """States for every chunk of `index` as `retrieval`'s template shows it to `model` (with its active adapter).
        chunk_ids: only these chunks (an in-memory cache for known prompts, e.g. calibration's; not to be saved).
        soft: the domain's soft tokens (`kvcache.soft`), stored after every passage."""
        head, separators = template_segments(tokenizer, retrieval)
        segments = {marker_key(n): encode(tokenizer, sep) for n, sep in enumerate(separators, 1)}
        digests = {}
        for chunk in index.chunks():
            if chunk_ids is not None and chunk.id not in chunk_ids:
                continue
            passage = Passage(chunk.id, chunk.doc_id, chunk.text, title=str((chunk.metadata or {}).get("title") or ""))
            segments[chunk_key(passage)] = encode(tokenizer, passage_body(passage))
            digests[chunk_key(passage)] = body_digest(passage)
        meta = {"index": index_fingerprint(index), "template": template_fingerprint(tokenizer, retrieval)}
        first = encode(tokenizer, separators[0])  # every body is computed as the first passage, after "[1]"
        lead = {key: first for key in digests}
        cache = cls.from_segments(model, encode(tokenizer, head), segments, lead=lead, batch_size=batch_size,
                                  meta=meta, progress=progress, soft=soft)
        cache.digests = digests
        return cache

    # -- storage --------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """One safetensors file, written whole or not at all (temporary file, fsync, rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path} is a folder; the frozen KV cache is one file (for example {path}/kv.safetensors)")
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": self.meta,
                  "spans": self.spans, "token_ids": self.token_ids, "digests": self.digests}
        tensors = {"keys": self.keys.contiguous().cpu(), "values": self.values.contiguous().cpu()}
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"retro_peft": json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, *, tokenizer=None, index=None, retrieval=None,
             layout: str = DEFAULT_KV_LAYOUT, soft: SoftTokens | None = None) -> FrozenKVCache:
        """Read a saved cache; with `model` / `index` / `tokenizer` + `retrieval`, refuse one built for others,
        and always one built with other soft tokens than `soft` (None: none)."""
        from safetensors import SafetensorError, safe_open

        check_kv_layout(layout)
        path = Path(path)
        if not path.is_file():
            raise InputError(f"frozen KV cache not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("retro_peft", "{}"))
                if header.get("format") != FORMAT:
                    raise InputError(f"{path} is not a retro-peft frozen KV cache")
                if header.get("format_version") != FORMAT_VERSION:
                    raise InputError(f"{path} has format version {header.get('format_version')}; "
                                     f"this retro-peft reads version {FORMAT_VERSION}: rebuild it")
                keys, values = f.get_tensor("keys"), f.get_tensor("values")
        except (SafetensorError, json.JSONDecodeError, OSError) as e:
            raise InputError(f"{path} is not a readable frozen KV cache ({e})") from None
        spans = {k: (int(a), int(b), int(c)) for k, (a, b, c) in header["spans"].items()}
        meta = header["meta"]
        recorded, given = meta.get("soft_tokens"), soft.fingerprint() if soft is not None else None
        if recorded != given:
            built = ("with other soft tokens than the domain's" if recorded and given else
                     "with soft tokens the domain does not have" if recorded else "without the domain's soft tokens")
            raise InputError(f"{path} was built {built}; rebuild it")
        cache = cls(keys, values, spans, header["token_ids"], meta, header.get("digests"), layout)
        cache.check(model=model, tokenizer=tokenizer, index=index, retrieval=retrieval, source=str(path))
        return cache

    def check(self, *, model=None, tokenizer=None, index=None, retrieval=None, source: str = "the cache") -> None:
        """Refuse to serve states computed for another model/adapter, index or template."""
        if model is not None:
            check_fingerprint({"weights": self.meta.get("weights")}, {"weights": weights_fingerprint(model)},
                              what=source, found_name=type(model).__name__)
            dtype = str(model_dtype(model)).replace("torch.", "")
            if self.meta.get("dtype") != dtype:
                raise InputError(f"{source} holds {self.meta.get('dtype')} states; the model runs in {dtype}")
        if index is not None and self.meta.get("index") != index_fingerprint(index):
            raise InputError(f"{source} was built from another version of index {getattr(index, 'path', '')}; "
                             "rebuild it after changing the index")
        if tokenizer is not None and retrieval is not None and \
                self.meta.get("template") != template_fingerprint(tokenizer, retrieval):
            raise InputError(f"{source} was built with another prompt template or tokenizer; rebuild it")

    # -- use ------------------------------------------------------------------------------------------------

    def prompts(self, tokenizer, questions: list[str], passages: list[list[Passage]], retrieval) -> list[CachedPrompt]:
        """Each question's prompt as this cache runs it, in its layout (see `layout.cached_prompts`)."""
        return cached_prompts(tokenizer, questions, passages, retrieval, layout=self.layout,
                              token_ids=self.token_ids, digests=self.digests)

    def with_layout(self, layout: str, recompute_tokens: int | None = None,
                    recompute_ratio: float | None = None) -> FrozenKVCache:
        """The same stored states (shared, not copied) used in another layout; recompute_tokens: blend's,
        recompute_ratio: deviation's."""
        other = FrozenKVCache(self.keys, self.values, self.spans, self.token_ids, self.meta, self.digests, layout)
        other.inv_freq = self.inv_freq
        if recompute_tokens is not None:
            other.recompute_tokens = recompute_tokens
        if recompute_ratio is not None:
            other.recompute_ratio = check_ratio(recompute_ratio)
        return other

    def assemble(self, rows: list[list[str]], device, dtype: torch.dtype | None = None):
        """The batch's context as a DynamicCache (what a model's forward takes) and its mask: each row's segments
        at their positions, rows left-padded (`assembly.assemble`)."""
        states, mask = assemble(self, rows, device, dtype)
        return as_cache(states), mask

    @staticmethod
    def assemble_rows(rows: list[tuple[object | None, list[str]]], model, tails: list[list[int]] | None = None):
        """A decode pass's context, its rows from any caches (`assembly.assemble_rows`), on `model`'s device;
        rows of a cache in the `blend` layout then have their later passages' first tokens recomputed by
        `model` (`blend.recompute`), rows in the `deviation` layout the tokens whose states deviate most
        (`blend.deviating`). tails: each row's tokens after its context; a recompute runs all but their last
        token in its pass. The batch runner calls it on any of the pass's caches. Returns (StackedStates, or
        with recomputed rows a DynamicCache, the mask: what `decode_steps` takes as `past`; and the tails'
        tokens the decode loop still prefills)."""
        device = next(model.parameters()).device
        past, mask = assemble_rows(rows, device)
        width = mask.shape[1]
        selected, ratios = [], []
        for cache, keys in rows:
            recomputes = cache is not None and keys and cache.layout in ("blend", "deviation")
            deviation = recomputes and cache.layout == "deviation"
            first = width - sum(cache.spans[k][1] for k in keys) if recomputes else 0
            selected.append(recompute_slots(cache, keys, first, None if deviation else cache.recompute_tokens)
                            if recomputes else [])
            ratios.append(cache.recompute_ratio if deviation else None)
        if not any(selected):
            return past, mask, tails
        if any(r is not None for r in ratios):
            selected = deviating(model, past, mask, context_ids(rows, width, device), selected, ratios)
        return recompute(model, as_cache(past), mask, selected, tails)

    def attach(self, model, *, check: bool = True) -> FrozenKVCache:
        """Check the states are this model's, and put them on its device (assembly then runs there).

        check=False: states the model has just computed (block-attention training), nothing to check.
        """
        if check:
            self.check(model=model)
        device = next(model.parameters()).device
        self.inv_freq = rotary_embedding(model).inv_freq.detach().to(device)
        self.keys, self.values = self.keys.to(device), self.values.to(device)
        return self


def load_or_build(path: str | Path, model, tokenizer, index, retrieval, *, layout: str | None = None,
                  progress: bool = True, soft: SoftTokens | None = None) -> FrozenKVCache:
    """The cache stored at `path` for this model (and active adapter), index and template; computed and
    saved there first if the file does not exist. A file built for anything else is refused, not replaced.

    Either way the states come back read from the file, which safetensors maps into memory: pages are read
    as queries touch them, can be dropped under memory pressure, and are shared by every process (server
    workers, replicas on one host) that serves the same file. (The freshly computed states would be
    private memory, the size of the whole file.) soft: the domain's soft tokens (its adapter's), if any."""
    path = Path(path)
    layout = check_kv_layout(layout)
    if not path.exists():
        FrozenKVCache.build(model, tokenizer, index, retrieval, progress=progress, soft=soft).save(path)
    return FrozenKVCache.load(path, model, tokenizer=tokenizer, index=index, retrieval=retrieval, layout=layout,
                              soft=soft)
