"""Retrieval quality: recall@k, MRR@10 and nDCG@10 of the gold documents.

Rankings are over documents: a query's retrieved chunks are reduced to their
documents in order of first appearance. Relevance is `gold_doc_ids` when the
QA item has them (SQuAD: the question's paragraph); otherwise a document is
relevant when one of its retrieved chunks contains an answer string.
Unanswerable questions are skipped: they have no gold.
"""

from __future__ import annotations

import math

from retro_peft.choices import SEARCH_MODES
from retro_peft.errors import InputError
from retro_peft.qa import QAItem

CUTOFFS = (1, 5, 10)
DEPTH = 10


def ranking_metrics(ranked_docs: list[str], relevant: set[str], n_relevant: int) -> dict[str, float]:
    out = {}
    for k in CUTOFFS:
        out[f"recall@{k}"] = len(relevant.intersection(ranked_docs[:k])) / n_relevant
    first = next((i for i, d in enumerate(ranked_docs[:DEPTH], start=1) if d in relevant), None)
    out["mrr@10"] = 1.0 / first if first else 0.0
    dcg = sum(1.0 / math.log2(i + 1) for i, d in enumerate(ranked_docs[:DEPTH], start=1) if d in relevant)
    idcg = sum(1.0 / math.log2(i + 1) for i in range(1, min(n_relevant, DEPTH) + 1))
    out["ndcg@10"] = dcg / idcg
    return out


def evaluate_retrieval(index, items: list[QAItem], modes=SEARCH_MODES, batch_size: int = 64,
                       **search_options) -> dict:
    """{"dense": {metric: mean}, "sparse": {...}, "hybrid": {...}, "n": number of questions scored}."""
    items = [it for it in items if not it.is_impossible and (it.gold_doc_ids or it.answers)]
    if not items:
        raise InputError("no answerable question with a gold document or an answer to evaluate")
    # Chunks, not documents, come back: ask for enough to fill DEPTH documents in most cases.
    k = 3 * DEPTH
    report: dict = {"n": len(items)}
    vectors = index.encoder.encode([it.question for it in items]) if any(m != "sparse" for m in modes) else None
    for mode in modes:
        totals: dict[str, float] = {}
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            hits = index.search_many([it.question for it in batch], k=k, mode=mode,
                                     query_vectors=None if vectors is None else vectors[start : start + len(batch)],
                                     **search_options)
            for item, item_hits in zip(batch, hits):
                ranked = list(dict.fromkeys(h.doc_id for h in item_hits))[:DEPTH]
                if item.gold_doc_ids:
                    relevant, n_rel = set(item.gold_doc_ids), len(set(item.gold_doc_ids))
                else:
                    answers = [a.lower() for a in item.answers]
                    relevant = {h.doc_id for h in item_hits if any(a in h.text.lower() for a in answers)}
                    n_rel = 1
                for name, value in ranking_metrics(ranked, relevant, n_rel).items():
                    totals[name] = totals.get(name, 0.0) + min(value, 1.0)
        report[mode] = {name: round(total / len(items), 4) for name, total in totals.items()}
    return report
