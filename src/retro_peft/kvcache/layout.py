"""How a prompt is cut into the frozen KV cache's stored segments.

A prompt (`generation.prompt.render`) is cut into segments:

    head | "[1]" | " (title) text" | "\\n[2]" | " (title) text" | ... | tail

head: the template up to the passages ("...user\\nPassages:\\n"), the same for
every question. Computed once each: the markers "[n]", right after the head,
and every passage body with the states it has as the first passage of a prompt
(after the head and "[1]"). Only the tail (question, instruction, answer cue)
runs through the model. The two layouts (`choices.KVLayout`) use the same stored
segments: `block` takes every passage from the store (whole passages only: one
that does not fit the budget is dropped, not cut); `prefix` builds the ordinary
prompt and takes only its head, "[1]" and first passage from the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from retro_peft.errors import InputError
from retro_peft.generation.prompt import (Passage, Prompt, build_prompt, encode, passage_body, passage_marker,
                                          render)

MAX_PASSAGES = 32  # markers "[1]".."[32]" are stored; a prompt never holds more passages
HEAD = "<head>"


def marker_key(n: int) -> str:
    return f"<marker {n}>"


def chunk_key(passage: Passage) -> str:
    return f"chunk:{passage.chunk_id}"


def is_chunk(key: str) -> bool:
    """A passage body's segment (not the head or a marker)."""
    return key.startswith("chunk:")


def body_digest(passage: Passage) -> str:
    """What a stored body was computed from: a passage given with other text is not served from the store."""
    return hashlib.sha1(passage_body(passage).encode()).hexdigest()


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


def template_fingerprint(tokenizer, retrieval) -> str:
    head, separators = template_segments(tokenizer, retrieval)
    probe = [encode(tokenizer, head)] + [encode(tokenizer, s) for s in separators[:2]] + \
        [encode(tokenizer, passage_body(Passage("p", "p", "Probe text, 123.", "Title")))]
    return hashlib.sha256(json.dumps([getattr(tokenizer, "name_or_path", ""), probe]).encode()).hexdigest()


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


def cached_prompts(tokenizer, questions: list[str], passages: list[list[Passage]], retrieval, *, layout: str,
                   token_ids: dict[str, list[int]], digests: dict[str, str]) -> list[CachedPrompt]:
    """Each question's prompt: whole passages (in rank order) while the token budget holds, then the tail
    (in the `prefix` layout the tail starts after the first passage).

    A row whose passages are not all stored (passages given by the caller, not from the index) gets the
    ordinary prompt (`build_prompt`), prefilled in full. token_ids: each stored segment's ids; digests: each
    stored body's `body_digest`.
    """
    if layout == "prefix":
        return [prefix_prompt(tokenizer, q, row, retrieval, token_ids=token_ids, digests=digests)
                for q, row in zip(questions, passages)]
    segments = template_segments(tokenizer, retrieval)
    out = []
    for question, row in zip(questions, passages):
        kept = list(row)[:MAX_PASSAGES]
        if not kept or any(digests.get(chunk_key(p)) != body_digest(p) for p in kept):
            prompt = build_prompt(tokenizer, question, list(row), retrieval)
            out.append(CachedPrompt(prompt, [], prompt.input_ids))
            continue
        cut = cut_prompt(tokenizer, question, kept, retrieval, segments, lambda key, _text: token_ids[key])
        if cut is None:  # not even one passage fits
            prompt = build_prompt(tokenizer, question, [], retrieval)
            out.append(CachedPrompt(prompt, [], prompt.input_ids))
            continue
        kept, keys, text, tail = cut
        ids = [t for k in keys for t in token_ids[k]] + tail
        out.append(CachedPrompt(Prompt(input_ids=ids, text=text, passages=kept), keys, tail))
    return out


def prefix_prompt(tokenizer, question: str, passages: list[Passage], retrieval, *, token_ids: dict[str, list[int]],
                  digests: dict[str, str]) -> CachedPrompt:
    """The prefix layout: the ordinary prompt (`build_prompt`, the one a full prefill runs), whose head, "[1]"
    and first passage come from the store when its token ids begin with exactly the stored ones (the first
    passage is stored and was not shortened to fit); the rest of its ids run through the model."""
    prompt = build_prompt(tokenizer, question, list(passages), retrieval)
    if prompt.passages:
        first = prompt.passages[0]
        keys = [HEAD, marker_key(1), chunk_key(first)]
        if digests.get(keys[2]) == body_digest(first):
            stored = [t for key in keys for t in token_ids[key]]
            if prompt.input_ids[:len(stored)] == stored:
                return CachedPrompt(prompt, keys, prompt.input_ids[len(stored):])
    return CachedPrompt(prompt, [], prompt.input_ids)  # nothing stored fits it: prefilled in full
