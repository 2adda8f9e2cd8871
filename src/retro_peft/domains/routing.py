"""Routing: which domain (if any) should answer a query.

The rule (a reciprocal-rank vote over all domains' hits, dense and sparse):

1. Embed the query once with the encoder all the domains' indexes share.
2. Dense: take each domain's top-k chunks by cosine similarity, merge them (the
   cosines are comparable: same encoder, normalised vectors) and keep the overall
   top k. Sparse: BM25 over the union of all domains' chunks (one BM25 built by the
   router, so that scores are comparable across domains; each index's own BM25
   has its own IDF), top k.
3. The hit at rank r (1-based) of each list votes `weight / r` for the domain it
   came from. The domain with most votes wins (ties: first domain given).
4. Fallback: if the best dense cosine over all domains is below `threshold`,
   nothing matches and the decision is `None` (= base model, no retrieval).

Defaults: k = 3, dense and sparse weights 1.0, threshold 0.41 (MiniLM cosine).
They were chosen on the tuning half of the Wikipedia-topics benchmark only
(benchmarks/routing.py; accuracy on its test half is in BENCHMARKS.md): k and the
sparse weight from a small grid (tuning accuracy 0.883; the plateau is flat: k 3-10
with sparse weight 1.0-1.5 are within 0.6 points, dense alone reaches only 0.836);
the threshold is the 1st percentile of in-domain tuning queries' best cosine, i.e.
about 1% of in-domain queries fall back. A different encoder
has a different cosine scale: re-tune the threshold for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np

from retro_peft.domains.registry import AUTO, get_domain, list_domains
from retro_peft.errors import EncoderMismatchError, InputError
from retro_peft.index import Encoder, Index, open_index
from retro_peft.index.sparse import SparseIndex


@dataclass
class RouterConfig:
    k: int = 3  # hits per retriever that vote
    dense_weight: float = 1.0
    sparse_weight: float = 1.0
    threshold: float = 0.41  # best dense cosine below this -> no domain (None)

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise InputError(f"router k must be a positive integer, got {self.k!r}")
        if self.dense_weight < 0 or self.sparse_weight < 0 or self.dense_weight + self.sparse_weight <= 0:
            raise InputError("router weights must be >= 0 and not both 0")


@dataclass(frozen=True)
class RouteDecision:
    domain: str | None  # None: no domain matches; answer with the base model, no retrieval
    score: float  # the chosen domain's share of the votes (0..1); 0 when domain is None
    scores_by_domain: dict[str, float]  # every domain's share of the votes
    similarity: float  # best dense cosine over all domains: what the threshold is compared with


class Router:
    """Routes queries to one of several domains' indexes (see the module docstring for the rule).

    domains: {domain name: Index, or an index name/path}. Every index must have
    been built with the same encoder; it is loaded once and shared.
    """

    def __init__(self, domains: Mapping[str, Index | str | Path], config: RouterConfig | None = None,
                 encoder: Encoder | None = None):
        self.config = config or RouterConfig()
        self.config.validate()
        if not domains:
            raise InputError("a router needs at least one domain")
        self.names = list(domains)
        self.indexes: dict[str, Index] = {}
        for name, index in domains.items():
            if not isinstance(index, Index):
                index = open_index(index, encoder=encoder)
            encoder = encoder or index.encoder  # the first index's encoder is shared by the others
            if index.manifest["encoder"]["fingerprint"] != encoder.fingerprint:
                raise EncoderMismatchError(
                    f"domain {name!r} (index {index.path}) was built with encoder {index.encoder_name!r}, unlike "
                    f"the other domains ({encoder.name!r}): routing compares scores, so all must share one encoder")
            self.indexes[name] = index
        self.encoder = encoder
        # One BM25 over every domain's chunks, so BM25 scores are comparable across domains.
        texts, owners = [], []
        for d, name in enumerate(self.names):
            chunks = self.indexes[name].chunks()
            texts += [c.text for c in chunks]
            owners += [d] * len(chunks)
        self._sparse = SparseIndex.build(texts)
        self._owner = np.array(owners, dtype=np.int64)

    @classmethod
    def from_registry(cls, names: Sequence[str] | None = None, config: RouterConfig | None = None,
                      encoder: Encoder | None = None) -> Router:
        """A router over registered domains (default: all of them)."""
        specs = [get_domain(n) for n in names] if names is not None else list_domains()
        if not specs:
            raise InputError("no domains to route between: register some with `retro-peft domain add`")
        return cls({s.name: s.index_path for s in specs}, config, encoder)

    def route(self, query: str) -> RouteDecision:
        return self.route_many([query])[0]

    def route_many(self, queries: Sequence[str], query_vectors: np.ndarray | None = None) -> list[RouteDecision]:
        if isinstance(queries, str):
            raise InputError("route_many takes a list of queries; use route() for one")
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise InputError("a query is empty")
        if not queries:
            return []
        cfg, n, n_domains = self.config, len(queries), len(self.names)
        if query_vectors is None:
            query_vectors = self.encoder.encode(list(queries))
        # Dense: every domain's top k, merged by cosine.
        scores = np.full((n, n_domains * cfg.k), -np.inf, dtype=np.float32)
        owners = np.repeat(np.arange(n_domains), cfg.k)
        for d, name in enumerate(self.names):
            hits = self.indexes[name].search_many(queries, cfg.k, "dense", query_vectors=query_vectors)
            for i, row in enumerate(hits):
                scores[i, d * cfg.k: d * cfg.k + len(row)] = [h.score for h in row]
        order = np.argsort(-scores, axis=1, kind="stable")[:, :cfg.k]
        dense_owner = np.where(np.isfinite(np.take_along_axis(scores, order, 1)), owners[order], -1)
        best = scores.max(axis=1)
        # Sparse: the router's own BM25 over all domains.
        _, rows = self._sparse.search(list(queries), cfg.k)
        sparse_owner = np.where(rows >= 0, self._owner[np.maximum(rows, 0)], -1)

        decisions = []
        rank_weight = 1.0 / np.arange(1, cfg.k + 1)
        for i in range(n):
            votes = np.zeros(n_domains)
            for owner, weight in ((dense_owner[i], cfg.dense_weight), (sparse_owner[i], cfg.sparse_weight)):
                live = owner >= 0
                np.add.at(votes, owner[live], weight * rank_weight[:len(owner)][live])
            shares = votes / votes.sum() if votes.sum() > 0 else votes
            by_domain = {name: float(s) for name, s in zip(self.names, shares)}
            similarity = float(best[i]) if np.isfinite(best[i]) else float("-inf")
            if similarity < cfg.threshold or votes.sum() <= 0:
                decisions.append(RouteDecision(None, 0.0, by_domain, similarity))
            else:
                winner = int(np.argmax(shares))
                decisions.append(RouteDecision(self.names[winner], float(shares[winner]), by_domain, similarity))
        return decisions

    def choose(self, domain: str, query: str) -> str | None:
        """The domain to use: `auto` routes the query; any other name must be one of this router's domains."""
        if domain == AUTO:
            return self.route(query).domain
        if domain not in self.indexes:
            raise InputError(f"unknown domain {domain!r}; this router has: {', '.join(self.names)}")
        return domain

    def close(self) -> None:
        for index in self.indexes.values():
            index.close()
