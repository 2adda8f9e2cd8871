"""Follow-up retrieval: recall@5 of a conversation's second question, by history strategy.

The follow-ups are generated here from the SQuAD articles (never stored in the project). Rule, per article:
its subject is the title without underscores and without a parenthetical ("Sky_(United_Kingdom)" ->
"Sky"). A follow-up is an answerable question that names the subject on its own (the subject, maybe after
"the", not followed by another capitalised word, a digit, "+" or "-": "Sky Italia" is not the subject); that mention
becomes a pronoun ("it", or "they" for a plural subject; "its"/"their" for "'s"). The conversation is
    user: another question of the same article that names the subject (the first one, in file order)
    assistant: that question's first gold answer
    user: the follow-up
and the follow-up's gold passage is its own paragraph.

Reported: recall@5 of the bare follow-up (the lower bound), of each history strategy (`concat`,
`rewrite` with the base model), and of the original standalone question (the upper bound).

    .venv/bin/python benchmarks/followups.py                       # the evaluation articles (3-4)
    .venv/bin/python benchmarks/followups.py --articles 0:5 --limit 40

Writes <out>/followups.json (default out: .bench/followups).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from common import SCRATCH, SQUAD, machine_summary, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="the generator whose base model rewrites (rewrite)")
    p.add_argument("--articles", default="3:5", help="SQuAD articles, e.g. 3:5 (the evaluation split)")
    p.add_argument("--index", default=str(SCRATCH / "index-squad5"))
    p.add_argument("--mode", default="hybrid", choices=("dense", "sparse", "hybrid"))
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--limit", type=int, help="the first N follow-ups")
    p.add_argument("--out", default=str(SCRATCH / "followups"))
    return p.parse_args(argv)


def subject_of(title: str) -> str:
    return re.sub(r"\s*\(.*\)\s*$", "", title.replace("_", " ")).strip()


def mention(subject: str) -> re.Pattern:
    # not part of a longer name: "Sky+", "Sky-high", "Sky Italia", "Sky 1" are not the subject
    return re.compile(rf"\b(?:[Tt]he\s+)?{re.escape(subject)}('s)?(?![\w+\-])(?!\s+[A-Z0-9])")


def pronoun_form(question: str, subject: str) -> str | None:
    """The question with its subject mention made a pronoun, or None when it names the subject nowhere."""
    plural = subject.endswith("s") and not subject.endswith("ss")
    m = mention(subject).search(question)
    if m is None:
        return None
    word = ("their" if plural else "its") if m.group(1) else ("they" if plural else "it")
    if m.start() == 0 or question[:m.start()].rstrip().endswith((".", "?", "!")):
        word = word.capitalize()
    return question[:m.start()] + word + question[m.end():]


def followups(items) -> list[dict]:
    """One conversation per follow-up question (see the module's rule)."""
    by_title: dict[str, list] = {}
    for it in items:
        by_title.setdefault(it.metadata["title"], []).append(it)
    out = []
    for title, group in by_title.items():
        subject = subject_of(title)
        naming = [it for it in group if it.answerable and pronoun_form(it.question, subject) is not None]
        if len(naming) < 2:
            continue
        for it in naming:
            first = next(x for x in naming if x.id != it.id)
            out.append({"id": it.id, "title": title, "subject": subject, "standalone": it.question,
                        "followup": pronoun_form(it.question, subject), "gold_doc_ids": list(it.gold_doc_ids),
                        "history": [{"role": "user", "content": first.question},
                                    {"role": "assistant", "content": first.answers[0]}]})
    return out


def recall(passages, gold) -> float:
    return sum(any(p.doc_id in g for p in row) for row, g in zip(passages, gold)) / max(len(gold), 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    from retro_peft.base_model import load_base_model
    from retro_peft.cli.train import parse_articles
    from retro_peft.generation import Generator, RetrievalConfig, SearchOptions
    from retro_peft.generation.prompt import check_history
    from retro_peft.index import IndexConfig, build_index, open_index
    from retro_peft.qa import load_qa

    path = Path(args.index)
    index = open_index(path) if (path / "manifest.json").exists() else build_index(path, [SQUAD], IndexConfig())
    convs = followups(load_qa(SQUAD, articles=parse_articles(args.articles)))[: args.limit]
    model, tokenizer, _ = load_base_model(args.model, dtype=torch.float32, device="cpu")
    generator = Generator(model, tokenizer, index=index, retrieval=RetrievalConfig(k=args.k, mode=args.mode))
    gold = [c["gold_doc_ids"] for c in convs]
    histories = [c["history"] for c in convs]
    report = {"machine": machine_summary(), "articles": args.articles, "n": len(convs), "k": args.k,
              "mode": args.mode, "examples": convs[:3], "recall": {}, "seconds": {}}
    runs = [("followup_bare", [c["followup"] for c in convs], None, "none"),
            ("concat", [c["followup"] for c in convs], histories, "concat"),
            ("rewrite", [c["followup"] for c in convs], histories, "rewrite"),
            ("standalone", [c["standalone"] for c in convs], None, "none")]
    for name, questions, history, strategy in runs:
        start = time.perf_counter()
        passages = generator.retrieve(questions, SearchOptions.of(history=strategy), history)
        report["seconds"][name] = round(time.perf_counter() - start, 2)
        report["recall"][name] = recall(passages, gold)
        report.setdefault("recall_at_1", {})[name] = recall([row[:1] for row in passages], gold)
        print(f"{name:14s} recall@{args.k} {report['recall'][name]:.3f}  recall@1 {report['recall_at_1'][name]:.3f}"
              f"  ({report['seconds'][name]} s)", flush=True)
    rewrites = generator.standalone([c["followup"] for c in convs[:5]], [check_history(h) for h in histories[:5]])
    report["rewrite_examples"] = [{"followup": c["followup"], "rewritten": r} for c, r in zip(convs, rewrites)]
    all_rewrites = generator.standalone([c["followup"] for c in convs], [check_history(h) for h in histories])
    report["rewrites_used"] = sum(r is not None for r in all_rewrites) / max(len(convs), 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "followups.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
