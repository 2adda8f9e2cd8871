"""Routing benchmark: does `Router` send a query to the right domain, and to none when none fits?

    RETRO_PEFT_HOME=/tmp/rp-routing .venv/bin/python benchmarks/routing.py --out routing.json
    .venv/bin/python benchmarks/routing.py --quick          # smoke run, < 1 minute

Data (read-only): ../shared/data/wikipedia-vital-10k-en.jsonl (relative to the project root).

- domains: one per topic (12 topics -> 12 FAISS/BM25 indexes of the lead summaries),
  sharing the MiniLM encoder.
- queries: each article's description (4 words or more, not containing the title);
  gold domain: the article's topic. Split by sha256(article id): even -> tuning,
  odd -> test. Only the tuning half chooses the rule's parameters: k and the sparse
  weight from a small grid (plus the dense-top-1 baseline), then the fallback
  threshold = the 1st percentile of the tuning queries' best dense cosine (floored to
  0.01). Accuracy is reported on the test half; a fallback (None) counts as wrong.
- fallback: (a) 20 hand-written questions unrelated to an encyclopedia (personal
  errands, chit-chat, tasks on the user's own things): share routed to None;
  (b) one topic held out (Mathematics): a router over the other 11 domains; share of
  that topic's test queries routed to None rather than to another domain.
- latency: `route()` one query at a time, end to end (query encoding included),
  and `route_many()` in batches of 64, per query.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import sys
import time

import numpy as np

from common import WIKI, is_tuning, machine_summary, pct, timed, wiki_query, write_json

HELD_OUT = "mathematics"
GRID = [(1, 0.0), (3, 0.0), (5, 0.0), (10, 0.0), (3, 1.0), (5, 1.0), (10, 1.0), (5, 0.5), (5, 1.5)]  # (k, sparse weight)
UNRELATED = [
    "what time does my dentist appointment start tomorrow",
    "remind me to buy milk and eggs after work",
    "can you reschedule my meeting with Sarah to Friday",
    "what is the wifi password for the office guest network",
    "how do I reset my online banking PIN",
    "lol ok see you later then",
    "thanks, that was really helpful!",
    "where did I park my car this morning",
    "send the quarterly report to my manager",
    "why is my laptop fan so loud today",
    "what should I cook for dinner with leftover rice",
    "is my package from the online order delayed",
    "summarise the email my landlord sent yesterday",
    "what did we decide in last week's team standup",
    "book a table for two at 7pm",
    "my toddler won't sleep, any tips for tonight",
    "turn the living room lights off",
    "how many vacation days do I have left this year",
    "what's the status of ticket JIRA-4821",
    "can you proofread my cover letter",
]


def slug(topic: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", topic.lower()).strip("-")


def load(per_topic: int | None):
    from retro_peft.index import Document

    docs: dict[str, list] = {}
    queries = []  # (article id, description, gold domain)
    with open(WIKI, encoding="utf-8") as f:
        for line in f:
            o = json.loads(line)
            domain = slug(o["topic"])
            if per_topic and len(docs.get(domain, [])) >= per_topic:
                continue
            docs.setdefault(domain, []).append(Document(o["id"], o["text"], {"title": o["title"], "topic": o["topic"]}))
            desc = wiki_query(o)
            if desc is not None:
                queries.append((o["id"], desc, domain))
    return docs, queries


def accuracy(decisions, gold) -> float:
    return sum(d.domain == g for d, g in zip(decisions, gold)) / max(len(gold), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 articles per topic, a smoke run")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--encoder", default="minilm", help="the domains' encoder: minilm, or a folder trained by "
                    "`benchmarks/retriever.py --task wiki` (on the tuning half's descriptions only)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from retro_peft import paths
    from retro_peft.domains import Router, RouterConfig
    from retro_peft.index import Encoder, IndexConfig, build_index

    t_start = time.time()
    docs, queries = load(30 if args.quick else None)
    encoder = Encoder(args.encoder)
    folder = paths.home() / "bench-routing" / ("quick" if args.quick else "full")
    indexes = {}
    t = time.time()
    for domain in sorted(docs):
        indexes[domain] = build_index(folder / domain, docs[domain], IndexConfig(encoder=args.encoder), overwrite=True)
        indexes[domain]._encoder = encoder  # same model: share one copy
    build_s = time.time() - t
    print(f"built {len(indexes)} domain indexes ({sum(map(len, docs.values()))} articles) in {build_s:.0f} s",
          file=sys.stderr)

    t = time.time()
    vectors = encoder.encode([q[1] for q in queries])
    print(f"embedded {len(queries)} queries in {time.time() - t:.0f} s", file=sys.stderr)
    tune = np.array([is_tuning(q[0]) for q in queries])
    gold = [q[2] for q in queries]
    tune_q = [q[1] for q, m in zip(queries, tune) if m]
    tune_gold = [g for g, m in zip(gold, tune) if m]
    test_q = [q[1] for q, m in zip(queries, tune) if not m]
    test_gold = [g for g, m in zip(gold, tune) if not m]

    # -- tuning half: the rule's parameters, then the threshold -------------------------------
    router = Router(indexes, RouterConfig(threshold=-1.0), encoder)
    grid = []
    for k, sparse_weight in GRID:
        router.config = RouterConfig(k=k, sparse_weight=sparse_weight, threshold=-1.0)
        grid.append({"k": k, "sparse_weight": sparse_weight,
                     "tuning_accuracy": accuracy(router.route_many(tune_q, vectors[tune]), tune_gold)})
        print(f"  tuning k={k} sparse={sparse_weight}: {grid[-1]['tuning_accuracy']:.4f}", file=sys.stderr)
    best = max(grid, key=lambda g: g["tuning_accuracy"])
    router.config = RouterConfig(k=best["k"], sparse_weight=best["sparse_weight"], threshold=-1.0)
    similarity = np.array([d.similarity for d in router.route_many(tune_q, vectors[tune])])
    threshold = float(np.floor(np.quantile(similarity, 0.01) * 100) / 100)
    config = RouterConfig(k=best["k"], sparse_weight=best["sparse_weight"], threshold=threshold)
    router.config = config

    # -- test half ----------------------------------------------------------------------------
    decisions = router.route_many(test_q, vectors[~tune])
    per_domain = {}
    for domain in sorted(docs):
        pairs = [(d, g) for d, g in zip(decisions, test_gold) if g == domain]
        per_domain[domain] = {"n": len(pairs), "accuracy": accuracy([p[0] for p in pairs], [p[1] for p in pairs])}
    test = {
        "n": len(test_q), "accuracy": accuracy(decisions, test_gold),
        "fallback_rate": sum(d.domain is None for d in decisions) / len(decisions),
        "accuracy_without_uncategorized": accuracy(*zip(*[(d, g) for d, g in zip(decisions, test_gold)
                                                          if g != "uncategorized"])),
        "per_domain": per_domain,
    }

    # -- fallback -----------------------------------------------------------------------------
    unrelated = router.route_many(UNRELATED)
    fallback_unrelated = {"n": len(UNRELATED), "fallback_rate": sum(d.domain is None for d in unrelated) / len(UNRELATED),
                          "routed": {q: d.domain for q, d in zip(UNRELATED, unrelated) if d.domain is not None}}
    held = Router({d: ix for d, ix in indexes.items() if d != HELD_OUT}, config, encoder)
    held_mask = np.array([(not m) and g == HELD_OUT for m, g in zip(tune, gold)])
    held_dec = held.route_many([q[1] for q, m in zip(queries, held_mask) if m], vectors[held_mask])
    fallback_held_out = {"topic": HELD_OUT, "n": len(held_dec),
                         "fallback_rate": sum(d.domain is None for d in held_dec) / max(len(held_dec), 1)}

    # -- latency ------------------------------------------------------------------------------
    sample = test_q[:50 if args.quick else 200]
    router.route(sample[0])  # warm-up
    single = [1000 * timed(router.route, q)[0] for q in sample]
    t = time.perf_counter()
    for i in range(0, len(sample), 64):
        router.route_many(sample[i:i + 64])
    batched = (time.perf_counter() - t) * 1000 / len(sample)
    latency = {"n": len(sample), "single_median_ms": statistics.median(single),
               "single_p95_ms": pct(single, 95), "batch64_per_query_ms": batched}

    results = {
        "date": _dt.date.today().isoformat(), "machine": machine_summary(),
        "command": "benchmarks/routing.py" + (" --quick" if args.quick else "")
        + (f" --encoder {args.encoder}" if args.encoder != "minilm" else ""),
        "encoder": encoder.describe(),
        "domains": len(indexes), "articles": sum(map(len, docs.values())), "queries": len(queries),
        "tuning_n": len(tune_q), "grid": grid,
        "rule": {"k": config.k, "dense_weight": config.dense_weight, "sparse_weight": config.sparse_weight,
                 "threshold": config.threshold},
        "test": test, "fallback_unrelated": fallback_unrelated, "fallback_held_out": fallback_held_out,
        "latency": latency, "build_s": build_s, "total_s": time.time() - t_start, "goal_accuracy": 0.90,
        "goal_met": test["accuracy"] >= 0.90,
    }
    print_table(results)
    if args.out:
        write_json(args.out, results)
    return 0


def print_table(r: dict) -> None:
    rule = r["rule"]
    print(f"\nRouting: {r['domains']} domains, {r['articles']} articles, {r['queries']} queries "
          f"({r['tuning_n']} tuning / {r['test']['n']} test); rule: k={rule['k']}, "
          f"sparse weight {rule['sparse_weight']}, threshold {rule['threshold']:.2f}\n")
    print("| metric | value |\n| --- | --- |")
    rows = [
        ("test accuracy (fallback counts as wrong)", f"{r['test']['accuracy']:.4f}"),
        ("test accuracy without 'Uncategorized'", f"{r['test']['accuracy_without_uncategorized']:.4f}"),
        ("in-domain test queries falling back", f"{r['test']['fallback_rate']:.4f}"),
        (f"unrelated questions falling back (n={r['fallback_unrelated']['n']})",
         f"{r['fallback_unrelated']['fallback_rate']:.2f}"),
        (f"held-out topic '{r['fallback_held_out']['topic']}' falling back (n={r['fallback_held_out']['n']})",
         f"{r['fallback_held_out']['fallback_rate']:.4f}"),
        ("latency, route() one query (median / p95)",
         f"{r['latency']['single_median_ms']:.1f} / {r['latency']['single_p95_ms']:.1f} ms"),
        ("latency, route_many() batches of 64, per query", f"{r['latency']['batch64_per_query_ms']:.2f} ms"),
        ("goal: test accuracy >= 0.90", "met" if r["goal_met"] else "not met"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n| domain | test n | accuracy |\n| --- | --- | --- |")
    for domain, v in r["test"]["per_domain"].items():
        print(f"| {domain} | {v['n']} | {v['accuracy']:.4f} |")
    print("\n| k | sparse weight | tuning accuracy (no threshold) |\n| --- | --- | --- |")
    for g in r["grid"]:
        print(f"| {g['k']} | {g['sparse_weight']} | {g['tuning_accuracy']:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
