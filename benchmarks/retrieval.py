"""Retrieval benchmark: quality, build throughput, query latency, and overhead over raw FAISS/bm25s.

    RETRO_PEFT_HOME=/tmp/rp-bench .venv/bin/python benchmarks/retrieval.py --out retrieval.json
    .venv/bin/python benchmarks/retrieval.py --quick          # smoke run, < 1 minute

Data (read-only, never copied): ../shared/data/squad-v2-dev-5-articles.json and
../shared/data/wikipedia-vital-10k-en.jsonl (relative to the project root).

- quality: dense, sparse, hybrid (RRF), hybrid with weighted fusion (the default), and
  hybrid + MaxSim reranker, on SQuAD (corpus: all 173 paragraphs; questions: the
  answerable ones of the evaluation split, last two articles; gold: the question's
  paragraph) and on the Wikipedia description-to-article task (query: the article's
  description, 4 words or more, not containing the title; gold: that article).
  Untuned settings only (RRF k=60; weighted 1:1): nothing is tuned on this data.
- build: chunks/s for the Wikipedia corpus with an empty embedding cache (a fresh
  RETRO_PEFT_HOME per cold run, so the user's cache is never touched) and rebuilt
  with the cache warm.
- latency: per mode, one query at a time and in batches of 64; end to end (query
  encoding included) and search only (precomputed query vectors).
- overhead: retro-peft `search_many(query_vectors=...)` against FAISS IndexFlatIP +
  bm25s on the same vectors, the same BM25 tokenisation (done on both sides) and a
  minimal numpy RRF, timed query by query, interleaved, in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

import plots
from common import SQUAD, machine_info, ms, pct, timed, wiki_data, write_json

K = 10
BATCH = 64


# -- data --------------------------------------------------------------------------------------


def squad_data(quick: bool):
    from retro_peft.index import load_documents
    from retro_peft.qa import load_qa

    items = [it for it in load_qa(SQUAD, articles=slice(3, None)) if not it.is_impossible]
    docs = load_documents([SQUAD])
    if quick:  # only the evaluation articles' paragraphs: fewer to embed
        titles = {it.metadata["title"] for it in items}
        docs = [d for d in docs if d.metadata["title"] in titles]
    return docs, items


# -- quality -----------------------------------------------------------------------------------


def quality(index, items, rerank_items, label: str) -> dict:
    from retro_peft.index import evaluate_retrieval
    from retro_peft.index.rerank import MaxSimReranker

    out = {"n": len(items)}
    t, r = timed(evaluate_retrieval, index, items, fusion="rrf")
    out.update({m: r[m] for m in ("dense", "sparse", "hybrid")})
    out["eval_seconds_three_modes"] = round(t, 2)
    t, r = timed(evaluate_retrieval, index, items, modes=("hybrid",), fusion="weighted")
    out["hybrid_weighted"] = r["hybrid"]
    # The reranker re-encodes every candidate token by token: costly on 2 cores, so on a
    # large query set it runs on a fixed random subsample, compared with plain hybrid on
    # the same subsample.
    t0, r0 = timed(evaluate_retrieval, index, rerank_items, modes=("hybrid",), fusion="rrf")
    t1, r1 = timed(evaluate_retrieval, index, rerank_items, modes=("hybrid",), fusion="rrf",
                   rerank=MaxSimReranker(index.encoder))
    out["rerank"] = {
        "n": len(rerank_items), "subsample": len(rerank_items) < len(items),
        "hybrid": r0["hybrid"], "hybrid_maxsim": r1["hybrid"],
        "seconds_per_query_hybrid": round(t0 / len(rerank_items), 4),
        "seconds_per_query_hybrid_maxsim": round(t1 / len(rerank_items), 4),
    }
    print(f"[quality] {label}: done", file=sys.stderr, flush=True)
    return out


# -- build -------------------------------------------------------------------------------------


def build_bench(docs, scratch: Path, cold_runs: int, warm_runs: int) -> tuple[dict, Path, str]:
    from retro_peft.index import IndexConfig, build_index

    cold, warm, n_chunks = [], [], None
    home = None
    for i in range(cold_runs):
        home = scratch / f"build-{i}"
        shutil.rmtree(home, ignore_errors=True)
        os.environ["RETRO_PEFT_HOME"] = str(home)  # fresh, empty embedding cache
        gc.collect()
        t, index = timed(build_index, home / "wiki", docs, IndexConfig(), overwrite=True, progress=False)
        n_chunks = len(index)
        cold.append(t)
        index.close()
        print(f"[build] cold {i + 1}/{cold_runs}: {t:.1f}s, {n_chunks} chunks", file=sys.stderr, flush=True)
    for i in range(warm_runs):
        gc.collect()
        t, index = timed(build_index, home / "wiki", docs, IndexConfig(), overwrite=True, progress=False)
        warm.append(t)
        index.close()
        print(f"[build] warm {i + 1}/{warm_runs}: {t:.1f}s", file=sys.stderr, flush=True)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    result = {
        "documents": len(docs), "chunks": n_chunks,
        "cold_seconds": [round(x, 2) for x in cold], "warm_seconds": [round(x, 2) for x in warm],
        "cold_chunks_per_s": round(n_chunks / cold_s, 1), "warm_chunks_per_s": round(n_chunks / warm_s, 1),
        "warm_speedup": round(cold_s / warm_s, 2),
        "note": "wall time of build_index, encoder load included; medians",
    }
    return result, home / "wiki", str(home)


# -- latency and overhead ----------------------------------------------------------------------


class Raw:
    """The same search done directly: FAISS IndexFlatIP, bm25s, minimal numpy RRF."""

    def __init__(self, vectors: np.ndarray, texts: list[str]):
        import bm25s
        import faiss

        from retro_peft.index.sparse import _stemmer

        self.bm25s, self.stem = bm25s, _stemmer()
        self.faiss = faiss.IndexFlatIP(vectors.shape[1])
        self.faiss.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(texts, stopwords="en", stemmer=self.stem, show_progress=False),
                        show_progress=False)

    def sparse(self, queries, n):
        tokens = self.bm25s.tokenize(queries, stopwords="en", stemmer=self.stem, return_ids=False, show_progress=False)
        tokens = [q or [""] for q in tokens]  # bm25s needs one token (it drops unknown ones itself)
        rows, scores = self.bm25.retrieve(tokens, k=n, show_progress=False)
        return scores, rows

    def search(self, queries, qv, k, mode):
        if mode == "dense":
            return self.faiss.search(qv, k)
        if mode == "sparse":
            return self.sparse(queries, k)
        n = max(4 * k, 40)
        ds, dr = self.faiss.search(qv, n)
        ss, sr = self.sparse(queries, n)
        ranks = 1.0 / (60.0 + np.arange(1, n + 1))
        out = []
        for i in range(len(queries)):
            s_rows = sr[i][ss[i] > 0]
            rows = np.concatenate([dr[i], s_rows])
            uniq, inv = np.unique(rows, return_inverse=True)
            fused = np.bincount(inv, weights=np.concatenate([ranks[: len(dr[i])], ranks[: len(s_rows)]]))
            top = np.lexsort((uniq, -fused))[:k]
            out.append((uniq[top], fused[top]))
        return out


def latency(index, items, raw: Raw, n_single: int, n_batches: int, rounds: int) -> dict:
    from retro_peft.index.rerank import MaxSimReranker

    rng = random.Random(1)
    queries = [it.question for it in rng.sample(items, min(len(items), max(n_single, n_batches * BATCH)))]
    single_q = queries[:n_single]
    batches = [queries[i * BATCH:(i + 1) * BATCH] for i in range(n_batches)]
    batches = [b for b in batches if len(b) == BATCH] or [queries[:BATCH]]
    enc = index.encoder
    qv_all = enc.encode(queries)
    vec_of = dict(zip(queries, qv_all))
    # warm up both sides (first calls allocate, import, fill caches)
    for mode in ("dense", "sparse", "hybrid"):
        index.search_many(queries[:4], K, mode, fusion="rrf", query_vectors=qv_all[:4])
        raw.search(queries[:4], qv_all[:4], K, mode)
        index.search_many(queries[:4], K, mode, fusion="rrf")
    out = {"k": K, "batch": BATCH, "n_single": len(single_q), "n_batches": len(batches), "rounds": rounds}
    for mode in ("dense", "sparse", "hybrid"):
        res = {}
        # end to end: query encoding included (none for sparse)
        times = []
        for _ in range(rounds):
            for q in single_q:
                t, _r = timed(index.search_many, [q], K, mode, fusion="rrf")
                times.append(t)
        res["single_e2e"] = summarize(times, 1)
        times = []
        for _ in range(rounds):
            for b in batches:
                t, _r = timed(index.search_many, b, K, mode, fusion="rrf")
                times.append(t)
        res["batch_e2e"] = summarize(times, BATCH)
        # search only, retro-peft vs raw, interleaved query by query (order alternates)
        rp, rw = [], []
        for r in range(rounds):
            for j, q in enumerate(single_q):
                qv = vec_of[q][None, :]
                pair = [("rp", partial(index.search_many, [q], K, mode, fusion="rrf", query_vectors=qv)),
                        ("raw", partial(raw.search, [q], qv, K, mode))]
                for name, fn in (pair if (r + j) % 2 == 0 else pair[::-1]):
                    t, _r = timed(fn)
                    (rp if name == "rp" else rw).append(t)
        res["single_search"], res["single_raw"] = summarize(rp, 1), summarize(rw, 1)
        res["single_overhead"] = round(statistics.median(rp) / statistics.median(rw), 3)
        rp, rw = [], []
        for r in range(rounds):
            for j, b in enumerate(batches):
                qv = np.stack([vec_of[q] for q in b])
                pair = [("rp", partial(index.search_many, b, K, mode, fusion="rrf", query_vectors=qv)),
                        ("raw", partial(raw.search, b, qv, K, mode))]
                for name, fn in (pair if (r + j) % 2 == 0 else pair[::-1]):
                    t, _r = timed(fn)
                    (rp if name == "rp" else rw).append(t)
        res["batch_search"], res["batch_raw"] = summarize(rp, BATCH), summarize(rw, BATCH)
        res["batch_overhead"] = round(statistics.median(rp) / statistics.median(rw), 3)
        out[mode] = res
        print(f"[latency] {mode}: done", file=sys.stderr, flush=True)
    # the reranker's cost: hybrid + MaxSim over the top 20, one query at a time
    reranker = MaxSimReranker(enc)
    n_rr = max(1, n_single // 10)
    index.search_many(single_q[:1], K, "hybrid", fusion="rrf", rerank=reranker)
    times = [timed(index.search_many, [q], K, "hybrid", fusion="rrf", rerank=reranker)[0] for q in single_q[:n_rr]]
    out["hybrid_maxsim"] = {"single_e2e": summarize(times, 1), "rerank_depth": 20}
    return out


def summarize(times: list[float], per_call: int) -> dict:
    return {"p50_ms": ms(pct(times, 50)), "p99_ms": ms(pct(times, 99)), "n": len(times),
            "qps": round(per_call * len(times) / sum(times), 1)}


# -- report ------------------------------------------------------------------------------------

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def quality_table(name: str, q: dict) -> list[str]:
    rr = q["rerank"]
    sub = f" (subsample of {rr['n']})" if rr["subsample"] else ""
    lines = [f"**{name}** ({q['n']} queries)", "",
             "| configuration | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    rows = [("dense", q["dense"]), ("sparse (BM25)", q["sparse"]), ("hybrid (RRF k=60)", q["hybrid"]),
            ("hybrid (weighted min-max 1:1, default)", q["hybrid_weighted"]),
            (f"hybrid RRF{sub}", rr["hybrid"]), (f"hybrid RRF + MaxSim rerank{sub}", rr["hybrid_maxsim"])]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(f"{m[x]:.3f}" for x in METRICS) + " |")
    best = max(q["dense"]["ndcg@10"], q["sparse"]["ndcg@10"])
    lines += ["", f"hybrid nDCG@10 - best single mode: {q['hybrid']['ndcg@10'] - best:+.4f}; "
              f"MaxSim rerank nDCG@10 change: {rr['hybrid_maxsim']['ndcg@10'] - rr['hybrid']['ndcg@10']:+.4f} "
              f"at {rr['seconds_per_query_hybrid_maxsim']:.3f} s/query vs {rr['seconds_per_query_hybrid']:.4f} s/query "
              "(evaluation, k=30 chunks)", ""]
    return lines


def report(res: dict) -> str:
    lines = [f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; {res['date']}; "
             f"`{res['command']}`", ""]
    lines += quality_table("SQuAD v2 dev, evaluation split, answerable", res["quality"]["squad"])
    lines += quality_table("Wikipedia vital 10k, description -> article", res["quality"]["wiki"])
    b = res["build"]
    lines += [f"**Build** ({b['documents']} documents, {b['chunks']} chunks; runs: cold {b['cold_seconds']} s, "
              f"warm {b['warm_seconds']} s)", "",
              "| build | seconds (median) | chunks/s |", "|---|---|---|",
              f"| cold (empty embedding cache) | {statistics.median(b['cold_seconds']):.2f} | {b['cold_chunks_per_s']} |",
              f"| warm rebuild | {statistics.median(b['warm_seconds']):.2f} | {b['warm_chunks_per_s']} |", "",
              f"warm rebuild speed-up: {b['warm_speedup']}x", ""]
    lat = res["latency"]
    lines += [f"**Query latency** (k={lat['k']}, {b['chunks']} chunks, FAISS flat; single: {lat['n_single']} queries x "
              f"{lat['rounds']} rounds; batched: {lat['n_batches']} batches of {lat['batch']} x {lat['rounds']} rounds)", "",
              "| mode | single p50 ms | single p99 ms | single q/s | batch-64 p50 ms | batch-64 p99 ms | batch-64 q/s |",
              "|---|---|---|---|---|---|---|"]
    for mode in ("dense", "sparse", "hybrid"):
        for kind, label in (("e2e", "end to end"), ("search", "search only")):
            s, bt = lat[mode][f"single_{kind}"], lat[mode][f"batch_{kind}"]
            lines.append(f"| {mode}, {label} | {s['p50_ms']} | {s['p99_ms']} | {s['qps']} | {bt['p50_ms']} | "
                         f"{bt['p99_ms']} | {bt['qps']} |")
    hm = lat["hybrid_maxsim"]["single_e2e"]
    lines += [f"| hybrid + MaxSim (depth 20), end to end | {hm['p50_ms']} | {hm['p99_ms']} | {hm['qps']} | | | |", ""]
    lines += ["**Overhead** over FAISS IndexFlatIP + bm25s directly (same query vectors, same tokenisation, "
              "minimal RRF; medians of interleaved calls)", "",
              "| mode | single retro-peft ms | single raw ms | single ratio | batch-64 retro-peft ms | batch-64 raw ms | batch-64 ratio |",
              "|---|---|---|---|---|---|---|"]
    for mode in ("dense", "sparse", "hybrid"):
        m = lat[mode]
        lines.append(f"| {mode} | {m['single_search']['p50_ms']} | {m['single_raw']['p50_ms']} | {m['single_overhead']}x | "
                     f"{m['batch_search']['p50_ms']} | {m['batch_raw']['p50_ms']} | {m['batch_overhead']}x |")
    g = res["goals"]
    lines += ["", "**Goals**", ""] + [f"- {k}: {'met' if v['met'] else 'MISSED'} ({v['detail']})" for k, v in g.items()]
    return "\n".join(lines) + "\n"


def goals(res: dict) -> dict:
    out = {}
    margins = {}
    for name, q in res["quality"].items():
        # The default hybrid fusion is the weighted one; RRF is reported beside it.
        margins[name] = q["hybrid_weighted"]["ndcg@10"] - max(q["dense"]["ndcg@10"], q["sparse"]["ndcg@10"])
    out["hybrid (default fusion) nDCG@10 >= best single mode on both, >= +0.02 on one"] = {
        "met": all(m >= 0 for m in margins.values()) and any(m >= 0.02 for m in margins.values()),
        "detail": ", ".join(f"{k} {v:+.4f}" for k, v in margins.items())}
    ratios = {f"{m} {s}": res["latency"][m][f"{s}_overhead"] for m in ("dense", "sparse", "hybrid")
              for s in ("single", "batch")}
    out["search overhead <= 1.2x"] = {"met": all(r <= 1.2 for r in ratios.values()),
                                      "detail": ", ".join(f"{k} {v}x" for k, v in ratios.items())}
    sp = res["build"]["warm_speedup"]
    out["warm rebuild >= 5x faster than cold"] = {"met": sp >= 5, "detail": f"{sp}x"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (< 1 minute)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--home", type=Path, help="scratch folder (default: $RETRO_PEFT_HOME, else a temporary folder)")
    p.add_argument("--cold-runs", type=int, help="cold builds (default 1: ~10 min each on 2 cores)")
    p.add_argument("--warm-runs", type=int, help="warm rebuilds (default 3; quick 1)")
    p.add_argument("--rounds", type=int, help="latency rounds (default 3; quick 1)")
    args = p.parse_args(argv)

    q = args.quick
    scratch = Path(args.home or os.environ.get("RETRO_PEFT_HOME") or tempfile.mkdtemp(prefix="rp-bench-"))
    scratch = scratch / "bench-retrieval"
    scratch.mkdir(parents=True, exist_ok=True)
    wiki_limit = 40 if q else None
    cold_runs = args.cold_runs or 1
    warm_runs = args.warm_runs or (1 if q else 3)
    rounds = args.rounds or (1 if q else 3)

    from retro_peft.index import IndexConfig, build_index

    res: dict = {"command": " ".join(["python", "benchmarks/retrieval.py", *(argv if argv is not None else sys.argv[1:])]),
                 "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": machine_info(), "quick": q, "k": K}
    docs, wiki_items = wiki_data(wiki_limit)
    res["build"], wiki_path, home = build_bench(docs, scratch, cold_runs, warm_runs)
    os.environ["RETRO_PEFT_HOME"] = home  # the warm cache from here on

    save = (lambda: write_json(args.out, res)) if args.out else (lambda: None)
    save()  # partial results after each section: a long run that is cut short keeps what it measured
    squad_inputs, squad_items = squad_data(q)
    squad_index = build_index(scratch / "squad", squad_inputs, IndexConfig(), overwrite=True)
    rng = random.Random(0)
    res["quality"] = {"squad": quality(squad_index, squad_items[: 10 if q else None],
                                       rng.sample(squad_items, 1 if q else 60), "squad")}
    squad_index.close()
    save()

    from retro_peft.index import open_index

    wiki_index = open_index(wiki_path)
    rr_items = rng.sample(wiki_items, min(len(wiki_items), 1 if q else 100))
    res["quality"]["wiki"] = quality(wiki_index, wiki_items, rr_items, "wiki")
    res["quality"]["wiki"]["task"] = "query = description (>= 4 words, title not in it), gold = its article"
    res["quality"]["squad"]["task"] = "corpus: 173 paragraphs; questions: answerable, last two articles; gold: paragraph"
    save()

    chunks = wiki_index.chunks()
    raw = Raw(wiki_index._vectors, [c.text for c in chunks])
    res["latency"] = latency(wiki_index, wiki_items, raw, n_single=10 if q else 200, n_batches=1 if q else 8,
                             rounds=rounds)
    wiki_index.close()
    res["goals"] = goals(res)
    text = report(res)
    print(text)
    save()
    if args.out:
        plots.chart_beside(args.out, res, plots.retrieval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
