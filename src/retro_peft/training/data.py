"""Retrieval-augmented training examples (RAFT-style) from QA pairs and an index.

For each question the prompt holds the top-k retrieved chunks plus `distractors`
random chunks from other documents. With probability P (the oracle fraction) an
answerable question keeps its gold chunk (inserted if retrieval missed it) and
the target is the answer; otherwise every chunk holding the answer is removed
and the target is the abstention phrase, so the model learns both to read the
context and to notice when it lacks the answer. Unanswerable questions always
target the abstention phrase. Labels are -100 except on the answer tokens and
the end-of-turn token. Everything is deterministic given the seed: each
question draws from its own RNG seeded by (seed, question id).

Which chunks are gold follows `RetrievalConfig.grounding`: the chunks of the item's gold
documents ("doc"), whatever the answer's words, or those holding the answer's words
("span", for items without gold documents under "auto"). A choice question's prompt lists
its choices (`with_choices`), as answering does.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from retro_peft.errors import InputError
from retro_peft.text import mentions
from retro_peft.generation.history import concat_queries
from retro_peft.generation.prompt import (Passage, RetrievalConfig, build_prompt, encode, end_of_turn_ids,
                                          check_history, fit_passages, passage_marker, with_choices)
from retro_peft.kvcache.layout import cut_prompt, template_segments
from retro_peft.qa import QAItem

IGNORE = -100
# Retrieved hits beyond k, to backfill when gold chunks are taken out.
BACKFILL = 4


@dataclass
class TrainingExample:
    item_id: str
    input_ids: list[int]
    labels: list[int]
    target: str
    has_gold: bool  # the prompt holds a chunk with the answer (target = answer)
    chunk_ids: list[str]  # the prompt's passages, in prompt order
    # Block attention (RetrievalConfig.block_attention): how input_ids begin as the frozen KV cache's
    # segments, ((segment key, tokens), ...): head, then marker and passage per passage; the rest is the tail.
    segments: tuple[tuple[str, int], ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)


def _passage_from_chunk(chunk) -> Passage:
    meta = chunk.metadata or {}
    return Passage(chunk_id=str(chunk.id), doc_id=str(chunk.doc_id), text=chunk.text, title=str(meta.get("title") or ""))


def _contains(passage: Passage, answers: tuple[str, ...]) -> bool:
    return any(mentions(passage.text, a) for a in answers)


def _supported_answer(passages: list[Passage], item: QAItem) -> str:
    """The target answer. A span answer is the first one that one of `passages` holds (else the first):
    the target must be what the prompt shows (a gold chunk may hold "United States" but not "USA")."""
    if item.kind != "span":
        return item.answers[0].strip()
    return next((a for a in item.answers if any(mentions(p.text, a) for p in passages)), item.answers[0]).strip()


def grounding_of(item: QAItem, grounding: str) -> str:
    """"doc" or "span": how `item`'s gold passages are found under the configured `grounding`."""
    if grounding == "auto":
        return "doc" if item.gold_doc_ids else "span"
    if grounding == "doc" and not item.gold_doc_ids:
        raise InputError(f"question {item.id!r} has no gold_doc_ids, which grounding 'doc' needs "
                         "(use grounding 'auto' to fall back to the answer's words for such questions)")
    return grounding


def is_gold(passage: Passage, item: QAItem, grounding: str) -> bool:
    """`passage` is one of `item`'s gold passages: a chunk of a gold document ("doc"), or a chunk holding the
    answer's words, from a gold document when those are known ("span", the rule before gold documents)."""
    in_gold_doc = passage.doc_id in item.gold_doc_ids
    if grounding_of(item, grounding) == "doc":
        return in_gold_doc
    return (in_gold_doc or not item.gold_doc_ids) and _contains(passage, item.answers)


def _gives_away(passage: Passage, item: QAItem) -> bool:
    """A passage that must not stay in an example that targets abstention: a gold document's, or, for a span
    answer, one that holds the answer's words anyway (a choice or free answer's words say nothing)."""
    return passage.doc_id in item.gold_doc_ids or (item.kind == "span" and _contains(passage, item.answers))


def citation_suffix(passages: list[Passage], gold: list[Passage]) -> str:
    """The markers of the gold passages, in prompt order (ALCE-style: "[1][3]"), that a trained answer ends with."""
    return "".join(passage_marker(i) for i, p in enumerate(passages, 1) if p in gold)


def check_items(items: list[QAItem]) -> None:
    if not items:
        raise InputError("no training questions")
    if not any(item.answerable for item in items):
        raise InputError("none of the training questions has an answer; the model would only learn to abstain")
    kinds = sorted({item.kind for item in items})
    if len(kinds) > 1:
        raise InputError(f"the training questions mix answer kinds ({', '.join(kinds)}); train one kind per adapter")


def build_examples(items: list[QAItem], index, tokenizer, retrieval: RetrievalConfig, *, seed: int = 0) -> list[TrainingExample]:
    """One training example per question. Retrieval for all questions is one batched `search_many` call."""
    check_items(items)
    for item in items:
        grounding_of(item, retrieval.grounding)  # refuses grounding "doc" for items without gold documents
        if item.history and retrieval.block_attention:
            raise InputError(f"question {item.id!r} has a conversation history, which block-attention training "
                             "(the frozen KV cache's layout: the prompt starts with the stored head) cannot hold")
    closed_book = retrieval.k == 0 and retrieval.distractors == 0
    if not closed_book and index is None:
        raise InputError("retrieval-augmented examples need an index (or k=0 and distractors=0 for closed book)")
    if closed_book:
        hits = [[] for _ in items]
        chunks = []
    else:
        hits = _search(index, items, retrieval) if retrieval.k else [[] for _ in items]
        chunks = [_passage_from_chunk(c) for c in index.chunks()]
    by_doc: dict[str, list[Passage]] = {}
    for p in chunks:
        by_doc.setdefault(p.doc_id, []).append(p)
    # block attention: the template's head and passage markers, as the frozen KV cache cuts them
    layout = template_segments(tokenizer, retrieval) if retrieval.block_attention and not closed_book else None
    examples = []
    for item, row in zip(items, hits):
        rng = random.Random(f"{seed}:{item.id}")
        retrieved = [Passage.from_hit(h) for h in row]
        examples.append(_example(item, retrieved, chunks, by_doc, tokenizer, retrieval, rng, closed_book, layout))
    return examples


def _search(index, items: list[QAItem], retrieval: RetrievalConfig):
    """Every question's hits in one batched search. A follow-up (an item with history) searches as
    `retrieval.history` says at answer time; `rewrite` needs the generator, so training searches those with
    `concat`, the strategy that needs none."""
    questions = [it.question for it in items]
    queries, vectors = questions, None
    if retrieval.history != "none" and any(it.history for it in items):
        queries, vectors = concat_queries(index, questions, [check_history(it.history) for it in items],
                                          retrieval.mode)
    return index.search_many(queries, k=retrieval.k + BACKFILL, mode=retrieval.mode, query_vectors=vectors)


def _example(item: QAItem, retrieved: list[Passage], chunks: list[Passage], by_doc: dict[str, list[Passage]],
             tokenizer, retrieval: RetrievalConfig, rng: random.Random, closed_book: bool,
             layout) -> TrainingExample:
    answerable = item.answerable
    keep_gold = answerable and rng.random() < retrieval.oracle_fraction
    grounding = retrieval.grounding
    gold = None
    if keep_gold and not closed_book:
        golds = [p for p in retrieved if is_gold(p, item, grounding)]
        # a span answer keeps the gold chunk that holds its words (another chunk of the document may not)
        gold = next((p for p in golds if _contains(p, item.answers)), golds[0] if golds else None)
        if gold is None:  # retrieval missed it: insert a gold chunk from the index (one holding the answer, if any)
            candidates = [p for d in item.gold_doc_ids for p in by_doc.get(d, []) if is_gold(p, item, grounding)]
            gold = next((p for p in candidates if _contains(p, item.answers)), candidates[0] if candidates else None)
    if gold is not None:
        others = [p for p in retrieved if p.chunk_id != gold.chunk_id][: max(retrieval.k - 1, 0)]
        chosen = [gold] + others
    elif answerable:
        # RAFT's (1 - P) share: no gold chunk, and nothing that gives the answer away, may remain.
        chosen = [p for p in retrieved if not _gives_away(p, item) and not is_gold(p, item, grounding)]
        chosen = chosen[: retrieval.k]
    else:
        # Unanswerable (SQuAD 2.0): the related paragraph stays; the model must see it lacks the answer.
        chosen = retrieved[: retrieval.k]
    chosen += _distractors(item, chosen, chunks, retrieval.distractors, rng, answerable)
    # priority: gold, retrieved, distractors
    question = with_choices(item.question, item.choices)
    if retrieval.block_attention:
        kept = block_prompt(tokenizer, question, chosen, retrieval, layout)[0] if chosen else []
    else:
        kept = fit_passages(tokenizer, question, chosen, retrieval, check_history(item.history))
    rng.shuffle(kept)  # the gold chunk's position must not give it away
    if retrieval.block_attention and kept:
        kept, segments, prompt_ids = block_prompt(tokenizer, question, kept, retrieval, layout)
    else:
        segments, prompt_ids = (), build_prompt(tokenizer, question, kept, retrieval, fitted=True,
                                                history=item.history).input_ids
    golds = [p for p in kept if is_gold(p, item, grounding)] if answerable else []
    has_gold = bool(golds) if not closed_book else answerable
    if has_gold:
        target = _supported_answer(golds, item)
        if retrieval.citations and golds:
            target = f"{target} {citation_suffix(kept, golds)}"
    else:
        target = retrieval.abstention
    answer_ids = encode(tokenizer, target) + end_of_turn_ids(tokenizer, retrieval)
    return TrainingExample(
        item_id=item.id,
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE] * len(prompt_ids) + answer_ids,
        target=target,
        has_gold=has_gold,
        chunk_ids=[p.chunk_id for p in kept],
        segments=segments,
    )


def block_prompt(tokenizer, question: str, passages: list[Passage], retrieval: RetrievalConfig, layout):
    """The prompt as the frozen KV cache runs it: whole passages (the lowest-priority dropped to fit).

    Returns (passages kept, ((segment key, tokens), ...), prompt token ids); no passage fits: ([], (), ids).
    """
    ids: dict[str, list[int]] = {}  # segment key -> tokens (a key's text is the same whichever passages stay)
    cut = cut_prompt(tokenizer, question, passages, retrieval, layout,
                     lambda key, text: ids.setdefault(key, encode(tokenizer, text)))
    if cut is None:
        return [], (), build_prompt(tokenizer, question, [], retrieval).input_ids
    kept, keys, _text, tail = cut
    return kept, tuple((key, len(ids[key])) for key in keys), [t for key in keys for t in ids[key]] + tail


def _distractors(item: QAItem, chosen: list[Passage], chunks: list[Passage], n: int, rng: random.Random,
                 answerable: bool) -> list[Passage]:
    """`n` random chunks from documents other than the gold ones and not already in the prompt."""
    if n <= 0 or not chunks:
        return []
    taken = {p.chunk_id for p in chosen}
    picked: list[Passage] = []
    for _ in range(50 * n):  # rejection sampling: the pool is usually large, the exclusions few
        p = chunks[rng.randrange(len(chunks))]
        if p.chunk_id in taken or (_gives_away(p, item) if answerable else p.doc_id in item.gold_doc_ids):
            continue
        picked.append(p)
        taken.add(p.chunk_id)
        if len(picked) == n:
            break
    return picked


def examples_sha256(examples: list[TrainingExample]) -> str:
    """Identity of the exact token sequences trained on (what a resume must see again)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.item_id.encode())
        h.update(bytes(str(ex.input_ids), "ascii"))
        h.update(bytes(str(ex.labels), "ascii"))
        if ex.segments:  # the same tokens split differently are another training run
            h.update(str(ex.segments).encode())
    return h.hexdigest()
