"""Frozen KV cache: the attention states of every indexed chunk, computed once.

A retrieval-augmented prompt is mostly passages that some earlier prompt already
held. Here each passage's key/value states are computed once, stored, and put
together at query time, so a prompt prefills only its question and instruction.

A prompt (`generation.prompt.render`) is cut into segments:

    head | "[1]" | " (title) text" | "\\n[2]" | " (title) text" | ... | tail

head: the template up to the passages ("...user\\nPassages:\\n"), the same for
every question. Computed once each: the markers "[n]", right after the head,
and every passage body with the states it has as the first passage of a prompt
(after the head and "[1]"). At query time a row's context is the head, then each
marker and body at its real position: the stored keys are rotated by the
position shift (RoPE rotations compose: R(p + d) = R(d) R(p)); values carry no
position. Only the tail (question, instruction, answer cue) runs through the
model, attending to all of it.

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
index and template: the file records their fingerprints and `load` refuses a
mismatch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from retro_peft.errors import InputError
from retro_peft.generation.generator import cache_kwarg, layer_states
from retro_peft.generation.prompt import (Passage, Prompt, build_prompt, encode, passage_body, passage_marker,
                                          render)
from retro_peft.storage import atomic_write_with

FORMAT = "retro-peft-kvcache"
FORMAT_VERSION = 1
SUPPORTED_MODELS = ("llama", "mistral", "qwen2")
MAX_PASSAGES = 32  # markers "[1]".."[32]" are stored; a prompt never holds more passages
HEAD = "<head>"
# How a prompt uses the stored states (the same file serves both):
#   block:  head and every passage from the store; the passages do not attend to each other (answers change)
#   prefix: the ordinary prompt (passages fitted to the budget as without a cache), its head, "[1]" and first
#           passage from the store, the rest prefilled attending to all of it: a full prefill's computation
#           (the first passage's stored states are what a full prefill computes for it), so the same answers
LAYOUTS = ("block", "prefix")


def marker_key(n: int) -> str:
    return f"<marker {n}>"


def chunk_key(passage: Passage) -> str:
    return f"chunk:{passage.chunk_id}"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class CachedPrompt:
    """A prompt as the frozen cache runs it: stored segments (`keys`), then `tail_ids` through the model.

    `prompt.input_ids` is the whole prompt (segments + tail), for counting and for the full-prefill
    reference. A prompt with no passages, or with a passage the cache does not hold, has no keys:
    it is prefilled in full.
    """

    prompt: Prompt
    keys: list[str]
    tail_ids: list[int]


def _new_cache(keys: list[torch.Tensor], values: list[torch.Tensor]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache


def rotary_embedding(model):
    """The model's rotary embedding (its `inv_freq`), after checking the model is one this cache supports."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODELS:
        raise InputError(f"the frozen KV cache supports {', '.join(SUPPORTED_MODELS)} models (rotary, full "
                         f"attention); this model is {getattr(config, 'model_type', None)!r}")
    if getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None):
        raise InputError("the frozen KV cache needs full attention; this model uses a sliding window")
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise InputError("the frozen KV cache needs a rotary embedding (`rotary_emb.inv_freq`); the model has none")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise InputError("the frozen KV cache cannot move keys under a scaled rotary embedding "
                         f"(attention_scaling {rotary.attention_scaling})")
    return rotary


def rotate(keys: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move rotary-encoded keys [..., tokens, head_dim] by `shift` [tokens] positions (HF's rotate-half layout)."""
    angle = shift.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    k = keys.to(torch.float32)
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * angle.cos() + rotated * angle.sin()).to(keys.dtype)


def weights_fingerprint(model) -> str:
    """The weights a forward pass uses, what the states depend on: the base model's and, for a PEFT model
    with its adapters enabled, the active adapter's (inside `disable_adapter()`, the base model's only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from retro_peft.adapters.model import base_fingerprint

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = hashlib.sha256(json.dumps(base_fingerprint(inner), sort_keys=True).encode())
    if any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in model.modules()):
        from peft import get_peft_model_state_dict

        # the adapter's weights, not its name: a bank may load it under another name
        for name, tensor in sorted(get_peft_model_state_dict(model, adapter_name=model.active_adapter).items()):
            h.update(name.encode())
            h.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def index_fingerprint(index) -> str:
    """The chunks (ids and texts) the states were computed from; any change to the index changes it."""
    h = hashlib.sha256()
    for chunk in index.chunks():
        h.update(f"{chunk.id}\0{chunk.text}\0{(chunk.metadata or {}).get('title', '')}\0".encode())
    return h.hexdigest()


def template_segments(tokenizer, retrieval) -> tuple[str, list[str]]:
    """The head text and the separator texts (marker n with what precedes it) of this template."""
    probe = Passage("probe", "probe", "probe text")
    heads = set()
    for question in ("first probe question?", "another probe, longer question?"):
        full = render(tokenizer, question, [probe], retrieval)
        cut = full.find(passage_marker(1) + passage_body(probe))
        if cut < 0:
            raise InputError("the prompt template does not hold passages the frozen KV cache can cut out")
        heads.add(full[:cut])
    if len(heads) != 1:
        raise InputError("the prompt template puts question text before the passages: no shared head to cache")
    head = heads.pop()
    two = render(tokenizer, "probe?", [probe, probe], retrieval)
    if not two[len(head) + len(passage_marker(1) + passage_body(probe)):].startswith("\n" + passage_marker(2)):
        raise InputError("the prompt template does not separate passages the way the frozen KV cache expects")
    return head, [passage_marker(1)] + ["\n" + passage_marker(n) for n in range(2, MAX_PASSAGES + 1)]


def segment_states(model, head_ids: list[int], segments: dict[str, list[int]], *,
                   lead: dict[str, list[int]] | None = None, batch_size: int = 8, progress: bool = False):
    """Key/value states of the head, then of each segment computed after the head and its `lead` tokens.

    Returns (keys, values, spans, token_ids) as `FrozenKVCache` holds them, on the model's device. Runs
    under whatever grad mode the caller is in: the cache builds under inference mode, block-attention
    training (`training.trainer.block_attention_forward`) with gradients through every segment.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

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
    # batches of similar lengths carry little padding (the stored order does not matter: spans say where)
    items = sorted(segments.items(), key=lambda item: len(lead.get(item[0], [])) + len(item[1]))
    for first in tqdm(range(0, len(items), batch_size), disable=not progress, desc="kv cache"):
        group = items[first:first + batch_size]
        inputs = [lead.get(key, []) + seg for key, seg in group]
        width = max(len(x) for x in inputs)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), n + width), dtype=torch.long)
        mask[:, :n] = 1
        for row, x in enumerate(inputs):  # right padding: real tokens never see it (causal)
            ids[row, :len(x)] = torch.tensor(x)
            mask[row, n:n + len(x)] = 1
        past = _new_cache([k.expand(len(group), -1, -1, -1).contiguous() for k, _ in head_states],
                          [v.expand(len(group), -1, -1, -1).contiguous() for _, v in head_states])
        positions = torch.arange(n, n + width, device=device).expand(len(group), -1)
        model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions,
              use_cache=True, logits_to_keep=1, **{cache_kw: past})
        states = [layer_states(past, i) for i in range(layers)]
        k_all = torch.stack([k[:, :, n:] for k, _ in states], dim=1)  # [rows, layers, kv_heads, width, d]
        v_all = torch.stack([v[:, :, n:] for _, v in states], dim=1)
        for row, (key, seg) in enumerate(group):
            skip = len(lead.get(key, []))
            parts_k.append(k_all[row, :, :, skip:skip + len(seg)])
            parts_v.append(v_all[row, :, :, skip:skip + len(seg)])
            spans[key] = (start, len(seg), n + skip)
            token_ids[key] = list(seg)
            start += len(seg)
    return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2), spans, token_ids


def cut_prompt(tokenizer, question: str, passages: list[Passage], retrieval, layout: tuple[str, list[str]],
               ids_of) -> tuple[list[Passage], list[str], str, list[int]] | None:
    """The prompt in stored segments: whole passages in the given (rank) order while the token budget holds.

    layout: `template_segments(tokenizer, retrieval)`; ids_of(segment key, segment text): its token ids.
    Returns (passages kept, segment keys, prompt text, tail token ids), or None if not even one passage fits.
    """
    if not question or not question.strip():
        raise InputError("the question is empty")
    head, separators = layout
    kept = list(passages)[:MAX_PASSAGES]
    while kept:
        text = render(tokenizer, question, kept, retrieval)
        prefix = head + "".join(separators[n - 1] + passage_body(p) for n, p in enumerate(kept, 1))
        if not text.startswith(prefix):
            raise InputError("the prompt template changed the passages' text: the frozen KV cache cannot "
                             "cut it into stored segments")
        texts = {HEAD: head}
        for n, p in enumerate(kept, 1):
            texts[marker_key(n)], texts[chunk_key(p)] = separators[n - 1], passage_body(p)
        keys = [HEAD] + [k for n, p in enumerate(kept, 1) for k in (marker_key(n), chunk_key(p))]
        tail = encode(tokenizer, text[len(prefix):])
        if sum(len(ids_of(k, texts[k])) for k in keys) + len(tail) <= retrieval.context_tokens:
            return kept, keys, text, tail
        kept.pop()  # whole passages only: drop the lowest-ranked one
    return None


class FrozenKVCache:
    """Stored key/value states of a head, passage markers and passage bodies (see the module docstring).

    keys, values: [layers, kv_heads, tokens, head_dim], every segment's tokens one after another;
    spans: {segment key: (start, length, position it was computed at)}.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spans: dict[str, tuple[int, int, int]],
                 token_ids: dict[str, list[int]], meta: dict, digests: dict[str, str] | None = None,
                 layout: str = "block"):
        self.keys, self.values, self.spans, self.token_ids, self.meta = keys, values, spans, token_ids, meta
        self.digests = digests or {}  # chunk segment -> digest of the passage text its states were computed from
        self.layout = check_layout(layout)  # see LAYOUTS
        self._inv_freq = None

    # -- building ---------------------------------------------------------------------------------------------

    @classmethod
    @torch.inference_mode()
    def from_segments(cls, model, head_ids: list[int], segments: dict[str, list[int]], *,
                      lead: dict[str, list[int]] | None = None, batch_size: int = 8, meta: dict | None = None,
                      progress: bool = False) -> "FrozenKVCache":
        """Compute the states of `head_ids`, then of every segment after the head and its `lead` tokens
        (lead[key], default none: what the segment sees between the head and itself; not stored)."""
        was_training = model.training
        model.eval()
        try:
            keys, values, spans, token_ids = segment_states(model, head_ids, segments, lead=lead,
                                                            batch_size=batch_size, progress=progress)
        finally:
            model.train(was_training)
        meta = dict(meta or {}, weights=weights_fingerprint(model), dtype=str(keys.dtype).replace("torch.", ""))
        return cls(keys.cpu(), values.cpu(), spans, token_ids, meta)

    @classmethod
    def build(cls, model, tokenizer, index, retrieval, *, batch_size: int = 8, progress: bool = False) -> "FrozenKVCache":
        """States for every chunk of `index` as `retrieval`'s template shows it to `model` (with its active adapter)."""
        head, separators = template_segments(tokenizer, retrieval)
        segments = {marker_key(n): encode(tokenizer, sep) for n, sep in enumerate(separators, 1)}
        digests = {}
        for chunk in index.chunks():
            passage = Passage(chunk.id, chunk.doc_id, chunk.text, title=str((chunk.metadata or {}).get("title") or ""))
            segments[chunk_key(passage)] = encode(tokenizer, passage_body(passage))
            digests[chunk_key(passage)] = _digest(passage_body(passage))
        meta = {"index": index_fingerprint(index), "template": _template_fingerprint(tokenizer, retrieval)}
        first = encode(tokenizer, separators[0])  # every body is computed as the first passage, after "[1]"
        lead = {key: first for key in digests}
        cache = cls.from_segments(model, encode(tokenizer, head), segments, lead=lead, batch_size=batch_size,
                                  meta=meta, progress=progress)
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
             layout: str = "block") -> "FrozenKVCache":
        """Read a saved cache; with `model` / `index` / `tokenizer` + `retrieval`, refuse one built for others."""
        from safetensors import SafetensorError, safe_open

        check_layout(layout)
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
        cache = cls(keys, values, spans, header["token_ids"], header["meta"], header.get("digests"), layout)
        cache.check(model=model, tokenizer=tokenizer, index=index, retrieval=retrieval, source=str(path))
        return cache

    def check(self, *, model=None, tokenizer=None, index=None, retrieval=None, source: str = "the cache") -> None:
        """Refuse to serve states computed for another model/adapter, index or template."""
        if model is not None:
            if self.meta.get("weights") != weights_fingerprint(model):
                raise InputError(f"{source} was built for other model weights (base model or adapter); rebuild it")
            dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).replace("torch.", "")
            if self.meta.get("dtype") != dtype:
                raise InputError(f"{source} holds {self.meta.get('dtype')} states; the model runs in {dtype}")
        if index is not None and self.meta.get("index") != index_fingerprint(index):
            raise InputError(f"{source} was built from another version of index {getattr(index, 'path', '')}; "
                             "rebuild it after changing the index")
        if tokenizer is not None and retrieval is not None and \
                self.meta.get("template") != _template_fingerprint(tokenizer, retrieval):
            raise InputError(f"{source} was built with another prompt template or tokenizer; rebuild it")

    # -- use ------------------------------------------------------------------------------------------------

    def prompts(self, tokenizer, questions: list[str], passages: list[list[Passage]], retrieval) -> list[CachedPrompt]:
        """Each question's prompt: whole passages (in rank order) while the token budget holds, then the tail
        (in the `prefix` layout the tail starts after the first passage).

        A row whose passages are not all stored (passages given by the caller, not from the index) gets the
        ordinary prompt (`build_prompt`), prefilled in full.
        """
        if self.layout == "prefix":
            return [self._prefix_prompt(tokenizer, q, row, retrieval) for q, row in zip(questions, passages)]
        layout = template_segments(tokenizer, retrieval)
        out = []
        for question, row in zip(questions, passages):
            kept = list(row)[:MAX_PASSAGES]
            if not kept or any(self.digests.get(chunk_key(p)) != _digest(passage_body(p)) for p in kept):
                prompt = build_prompt(tokenizer, question, list(row), retrieval)
                out.append(CachedPrompt(prompt, [], prompt.input_ids))
                continue
            cut = cut_prompt(tokenizer, question, kept, retrieval, layout, lambda key, _text: self.token_ids[key])
            if cut is None:  # not even one passage fits
                prompt = build_prompt(tokenizer, question, [], retrieval)
                out.append(CachedPrompt(prompt, [], prompt.input_ids))
                continue
            kept, keys, text, tail = cut
            ids = [t for k in keys for t in self.token_ids[k]] + tail
            out.append(CachedPrompt(Prompt(input_ids=ids, text=text, passages=kept), keys, tail))
        return out

    def _prefix_prompt(self, tokenizer, question: str, passages: list[Passage], retrieval) -> CachedPrompt:
        """The prefix layout: the ordinary prompt (`build_prompt`, the one a full prefill runs), whose head, "[1]"
        and first passage come from the store when its token ids begin with exactly the stored ones (the first
        passage is stored and was not shortened to fit); the rest of its ids run through the model."""
        prompt = build_prompt(tokenizer, question, list(passages), retrieval)
        if prompt.passages:
            first = prompt.passages[0]
            keys = [HEAD, marker_key(1), chunk_key(first)]
            if self.digests.get(keys[2]) == _digest(passage_body(first)):
                stored = [t for key in keys for t in self.token_ids[key]]
                if prompt.input_ids[:len(stored)] == stored:
                    return CachedPrompt(prompt, keys, prompt.input_ids[len(stored):])
        return CachedPrompt(prompt, [], prompt.input_ids)  # nothing stored fits it: prefilled in full

    def assemble(self, rows: list[list[str]], device, dtype: torch.dtype | None = None):
        """The batch's context as a KV cache: each row's segments at their positions, rows left-padded.

        Returns (cache, mask [rows, width]); a row with no segments is all padding.
        """
        if self._inv_freq is None:
            raise InputError("attach the model first (FrozenKVCache.attach(model))")
        lengths = [sum(self.spans[k][1] for k in keys) for keys in rows]
        width = max(lengths, default=0)
        # One gather for the whole batch: slot (row, t) takes stored token index[row, t], moved by shift[row, t]
        # positions; left-padding slots take token 0 and are masked out.
        index = torch.zeros((len(rows), width), dtype=torch.long)
        shift = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, segs in enumerate(rows):
            pad, pos = width - lengths[r], 0
            for key in segs:
                start, length, computed_at = self.spans[key]
                index[r, pad + pos:pad + pos + length] = torch.arange(start, start + length)
                shift[r, pad + pos:pad + pos + length] = pos - computed_at  # computed at `computed_at`, now at `pos`
                pos += length
            mask[r, pad:] = 1
        layers, kv_heads, _, head_dim = self.keys.shape
        flat = index.reshape(-1).to(self.keys.device)
        keys = rotate(self.keys[:, :, flat], shift.reshape(-1).to(self.keys.device), self._inv_freq)
        values = self.values[:, :, flat]
        # [layers, kv_heads, rows * width, head_dim] -> [layers, rows, kv_heads, width, head_dim]
        keys, values = (x.view(layers, kv_heads, len(rows), width, head_dim).transpose(1, 2)
                        .to(device=device, dtype=dtype or self.keys.dtype).contiguous() for x in (keys, values))
        mask = mask.to(device)
        return _new_cache(list(keys.unbind(0)), list(values.unbind(0))), mask

    def attach(self, model, *, check: bool = True) -> "FrozenKVCache":
        """Check the states are this model's, and put them on its device (assembly then runs there).

        check=False: states the model has just computed (block-attention training), nothing to check.
        """
        if check:
            self.check(model=model)
        device = next(model.parameters()).device
        self._inv_freq = rotary_embedding(model).inv_freq.detach().to(device)
        self.keys, self.values = self.keys.to(device), self.values.to(device)
        return self


def decode_inputs(rows: list[tuple["FrozenKVCache | None", "CachedPrompt | Prompt"]], device):
    """What one decode batch runs: each row's token ids, and the stored context they follow (or None).

    rows: (cache, the row's CachedPrompt) for rows that answer through a frozen cache, (None, Prompt) for
    the others. Rows with stored passages prefill only their tail; a batch where no row has any is an
    ordinary one (no context).
    """
    stored = [(cache, p) if isinstance(p, CachedPrompt) and p.keys else (None, None) for cache, p in rows]
    if all(p is None for _, p in stored):
        return [(p.prompt if isinstance(p, CachedPrompt) else p).input_ids for _, p in rows], None
    sequences = [p.tail_ids if isinstance(p, CachedPrompt) else p.input_ids for _, p in rows]
    return sequences, assemble_rows([(cache, p.keys if p else []) for cache, p in stored], device)


def assemble_rows(rows: list[tuple["FrozenKVCache | None", list[str]]], device, dtype: torch.dtype | None = None):
    """A batch's context when its rows come from different caches (rows of different domains).

    rows: (cache, segment keys) per row; a row with no cache or no keys is all padding (prefilled in full).
    Each cache assembles its own rows; the parts are left-padded to one width. Returns (cache, mask).
    """
    groups: dict[int, tuple[FrozenKVCache, list[int]]] = {}
    for i, (cache, keys) in enumerate(rows):
        if cache is not None and keys:
            groups.setdefault(id(cache), (cache, []))[1].append(i)
    if len(groups) == 1 and len(next(iter(groups.values()))[1]) == len(rows):  # one cache holds every row
        cache, _ = next(iter(groups.values()))
        return cache.assemble([keys for _, keys in rows], device, dtype)
    parts = [(members, *cache.assemble([rows[i][1] for i in members], device, dtype))
             for cache, members in groups.values()]
    width = max((mask.shape[1] for _, _, mask in parts), default=0)
    first = parts[0][1]
    layers = len(first.layers) if hasattr(first, "layers") else len(first.key_cache)
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
    return _new_cache(keys_out, values_out), mask_out


def check_layout(layout: str | None) -> str:
    """The layout to use (None: block, the default), or a clear error for an unknown one."""
    if layout is None:
        return "block"
    if layout not in LAYOUTS:
        raise InputError(f"unknown frozen KV cache layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def load_or_build(path: str | Path, model, tokenizer, index, retrieval, *, layout: str | None = None,
                  progress: bool = True) -> FrozenKVCache:
    """The cache stored at `path` for this model (and active adapter), index and template; computed and
    saved there first if the file does not exist. A file built for anything else is refused, not replaced.

    Either way the states come back read from the file, which safetensors maps into memory: pages are read
    as queries touch them, can be dropped under memory pressure, and are shared by every process (server
    workers, replicas on one host) that serves the same file. (The freshly computed states would be
    private memory, the size of the whole file.)"""
    path = Path(path)
    layout = check_layout(layout)
    if not path.exists():
        FrozenKVCache.build(model, tokenizer, index, retrieval, progress=progress).save(path)
    return FrozenKVCache.load(path, model, tokenizer=tokenizer, index=index, retrieval=retrieval, layout=layout)


def _template_fingerprint(tokenizer, retrieval) -> str:
    head, separators = template_segments(tokenizer, retrieval)
    probe = [encode(tokenizer, head)] + [encode(tokenizer, s) for s in separators[:2]] + \
        [encode(tokenizer, passage_body(Passage("p", "p", "Probe text, 123.", "Title")))]
    return hashlib.sha256(json.dumps([getattr(tokenizer, "name_or_path", ""), probe]).encode()).hexdigest()
