"""Benchmark the serving cache's semantic tier: false hits on distinct questions, hits on paraphrases.

    .venv/bin/python benchmarks/semantic_cache.py --out benchmarks/results/semantic-cache-cpu.json

The questions are SQuAD's (../shared/data, all five articles); the embeddings MiniLM's (the encoder the
domains' indexes use by default) of `semantic_text` (as the server embeds them); the look-up the server's
own `SemanticIndex`, one bucket per paragraph (as one domain and settings: every question of a paragraph
is a candidate for every other), as the server runs it (cosine and the same content words) and by the
embedding alone (`embedding_only`: what a cosine threshold by itself would serve).

  false hits: each paragraph's distinct questions (different text after lower-casing and stripping) are
              cached, then each is asked again with its own entry taken out: a hit is an answer given for
              another question (SQuAD 2.0's unanswerable questions are often one word away from an
              answerable one: exactly what must not hit). Reported at several thresholds, and the closest
              pair found, so the default's margin shows.
  paraphrases: each cached question asked in rewritten forms made by code (a polite prefix, contractions
               and no question mark, a request form): a hit on its own entry is a true hit, on another
               question's a false hit. The server's filler words include these rewrites' framing words, so
               they pass its word check by design; what the paraphrase rate measures is the cosine threshold.

Goal (issue 20): 0 false hits at the default threshold (`serving.settings.SEMANTIC_THRESHOLD`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time

import numpy as np

from common import SQUAD, machine_info, print_json

from retro_peft.index import Encoder
from retro_peft.serving.cache import SemanticIndex, semantic_text
from retro_peft.serving.settings import SEMANTIC_THRESHOLD

THRESHOLDS = tuple(sorted({0.8, 0.85, 0.9, 0.95, 0.97, 0.99, SEMANTIC_THRESHOLD}))

_CONTRACTIONS = [(r"\bWhat is\b", "What's"), (r"\bWho is\b", "Who's"), (r"\bWhere is\b", "Where's"),
                 (r"\bdid not\b", "didn't"), (r"\bdoes not\b", "doesn't"), (r"\bis not\b", "isn't")]


def paraphrases(question: str) -> dict[str, str]:
    """Rewrites of a question that keep its meaning, by rule."""
    q = question.strip()
    bare = q.rstrip("?").strip()
    lowered = bare[0].lower() + bare[1:] if bare else bare
    contracted = bare
    for pattern, short in _CONTRACTIONS:
        contracted = re.sub(pattern, short, contracted)
    return {"polite_prefix": f"Could you tell me {lowered}?",
            "contracted_no_mark": contracted.lower(),
            "request_form": f"I would like to know: {bare}?"}


def paragraphs() -> list[list[str]]:
    """Each paragraph's distinct questions (by text, lower-cased and stripped)."""
    data = json.loads(SQUAD.read_text())
    out = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            seen, questions = set(), []
            for qa in paragraph["qas"]:
                norm = qa["question"].strip().lower()
                if norm and norm not in seen:
                    seen.add(norm)
                    questions.append(qa["question"].strip())
            if len(questions) >= 2:
                out.append(questions)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    encoder = Encoder("minilm")
    groups = paragraphs()
    kinds = list(paraphrases(groups[0][0]))
    texts = [q for g in groups for q in g]
    start = time.perf_counter()  # all in one call: as the server does, each text as `semantic_text` makes it
    flat = encoder.encode([semantic_text(t) for t in texts] +
                          [semantic_text(paraphrases(t)[k]) for k in kinds for t in texts])
    embed_s = time.perf_counter() - start
    bounds = np.cumsum([0] + [len(g) for g in groups])
    vectors = [flat[a:b] for a, b in zip(bounds, bounds[1:])]
    rewritten = [[flat[(k + 1) * len(texts) + a:(k + 1) * len(texts) + b] for k in range(len(kinds))]
                 for a, b in zip(bounds, bounds[1:])]

    closest = max(((float(s), g[i], g[j]) for g, v in zip(groups, vectors)
                   for i, j in zip(*np.triu_indices(len(g), 1)) for s in [v[i] @ v[j]]), key=lambda t: t[0])
    results = {"server": {}, "embedding_only": {}}
    examples_of = {"server": [], "embedding_only": []}
    for (mode, same_words), threshold in itertools.product([("server", True), ("embedding_only", False)],
                                                           THRESHOLDS):
        false_hits = examples = 0
        para_hits = {k: 0 for k in kinds}
        para_false = {k: 0 for k in kinds}
        for g, v, rv in zip(groups, vectors, rewritten):
            for i in range(len(g)):  # every other question of the paragraph cached: does question i hit one?
                index = SemanticIndex(threshold, max_entries=10_000, same_words=same_words)
                for j in range(len(g)):
                    if j != i:
                        index.add("p", g[j], v[j], str(j))
                hit = index.nearest("p", g[i], v[i])
                false_hits += hit is not None
                if hit is not None and len(examples_of[mode]) < 5 and threshold == SEMANTIC_THRESHOLD:
                    examples_of[mode].append([g[i], g[int(hit)]])
            index = SemanticIndex(threshold, max_entries=10_000, same_words=same_words)
            for j in range(len(g)):
                index.add("p", g[j], v[j], str(j))
            for k, kind in enumerate(kinds):
                for i in range(len(g)):
                    found = index.nearest("p", paraphrases(g[i])[kind], rv[k][i])
                    para_hits[kind] += found == str(i)
                    para_false[kind] += found is not None and found != str(i)
            examples += len(g)
        results[mode][str(threshold)] = {
            "false_hits": false_hits, "distinct_questions": examples, "false_hit_rate": false_hits / examples,
            "paraphrase_hit_rate": {k: para_hits[k] / examples for k in kinds},
            "paraphrase_hit_rate_all": sum(para_hits.values()) / (examples * len(kinds)),
            "paraphrase_false_hits": para_false}
    print_json({"benchmark": "semantic_cache", "machine": machine_info(), "encoder": "minilm",
                "default_threshold": SEMANTIC_THRESHOLD, "paragraphs": len(groups),
                "distinct_questions": sum(len(g) for g in groups), "embed_s": round(embed_s, 1),
                "closest_distinct_pair": {"cosine": round(closest[0], 4), "a": closest[1], "b": closest[2]},
                "paraphrase_examples": {k: paraphrases(groups[0][0])[k] for k in kinds},
                "false_hit_examples_at_default": examples_of, "by_threshold": results}, args.out)


if __name__ == "__main__":
    main()
