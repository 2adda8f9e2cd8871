"""Combining ranked lists: reciprocal rank fusion and weighted score fusion.

Both take, per retriever, arrays of (scores, rows) for one query, rows -1 for
empty slots, and return (rows, scores) sorted best first.
"""

from __future__ import annotations

import numpy as np

RRF_K = 60


def reciprocal_rank_fusion(ranked: list[np.ndarray], weights: list[float] | None = None, k: int = RRF_K):
    """score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1 (Cormack et al., 2009)."""
    weights = weights or [1.0] * len(ranked)
    fused: dict[int, float] = {}
    for rows, w in zip(ranked, weights):
        for rank, row in enumerate(rows[rows >= 0].tolist(), start=1):
            fused[row] = fused.get(row, 0.0) + w / (k + rank)
    return _sorted(fused)


def weighted_score_fusion(results: list[tuple[np.ndarray, np.ndarray]], weights: list[float]):
    """score(d) = sum_i w_i * minmax_i(score_i(d)); a retriever that missed d contributes 0."""
    fused: dict[int, float] = {}
    for (scores, rows), w in zip(results, weights):
        keep = rows >= 0
        scores, rows = scores[keep], rows[keep]
        if not len(rows):
            continue
        lo, hi = float(scores.min()), float(scores.max())
        norm = (scores - lo) / (hi - lo) if hi > lo else np.ones_like(scores)
        for row, s in zip(rows.tolist(), norm.tolist()):
            fused[row] = fused.get(row, 0.0) + w * s
    return _sorted(fused)


def _sorted(fused: dict[int, float]):
    if not fused:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    rows = np.fromiter(fused.keys(), dtype=np.int64, count=len(fused))
    scores = np.fromiter(fused.values(), dtype=np.float64, count=len(fused))
    order = np.lexsort((rows, -scores))  # ties broken by row for determinism
    return rows[order], scores[order].astype(np.float32)
