"""Answers beyond verbatim spans: a choice task and a free-form task from the Wikipedia leads, and the SQuAD split.

Tasks, generated here from the shared data (never stored in the project):
  topic     "Which topic does the article about TITLE belong to?": one of the file's 12 topics (choice);
            the lead rarely names its topic, so no span of a passage is the answer
  describe  "Describe TITLE in a few words.": the article's short description (free-form)
  squad     the SQuAD 2.0 standard split (train on articles 0-2, evaluate on 3-4) with grounding auto,
            citation markers and the calibrated abstention head
Wikipedia articles are split into train / test with a fixed seed (`--seed`); their index is every lead
summary (title as metadata; neither topic nor description is indexed).

Variants per task: base + retrieval; RetroLoRA with grounding `span` and no citation markers (retro-peft's
behaviour before grounding by document); RetroLoRA with grounding `doc` (+ markers); and two baselines
without a model: the majority class (the test questions' most frequent answer) and retrieval-only (topic:
the most frequent topic among the top-10 retrieved articles whose topic the training split gives;
describe: the top passage's first sentence).

The GPU machine has neither the encoder's weights nor the index's packages, so retrieval is recorded on
the CPU machine with the real indexes (`--record FILE`: every search the run makes) and replayed there
(`--replay FILE`): the same hits, in the same order.

    .venv/bin/python benchmarks/answer_kinds.py --record .bench/answer-kinds-hits.json.gz     # CPU machine
    PYTHONPATH=src python benchmarks/answer_kinds.py --replay hits.json.gz --device cuda --tasks topic,describe
    .venv/bin/python benchmarks/answer_kinds.py --tasks topic --steps 2 --n-train 16 --n-test 8   # smoke (CPU)

Writes <out>/answer-kinds.json and .md (default out: .bench/answer-kinds).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

import plots
from common import SCRATCH, SQUAD, WIKI, machine_summary, write_json

TRAIN_ARTICLES, EVAL_ARTICLES = slice(0, 3), slice(3, 5)
TASKS = ("topic", "describe", "squad")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="topic,describe,squad")
    p.add_argument("--variants", default="baselines,base,span,doc", help="subset of baselines,base,span,doc")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, help="default: 8 on cuda, 4 on cpu")
    p.add_argument("--n-train", type=int, default=1200, help="Wikipedia articles per task's training split")
    p.add_argument("--n-test", type=int, default=400, help="Wikipedia articles per task's test split")
    p.add_argument("--squad-limit", type=int, help="evaluate the first N SQuAD questions (default: all 457)")
    p.add_argument("--squad-oracle-fraction", type=float, default=1.0,
                   help="RAFT's P on SQuAD (1.0: the setting of the SQuAD RetroLoRA row in BENCHMARKS.md)")
    p.add_argument("--answer-rate", type=float, default=0.9, help="SQuAD: the calibrated head's answer rate")
    p.add_argument("--head-variants", action="store_true",
                   help="SQuAD: also evaluate answerability heads fitted other ways on the same adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--record", help="CPU machine: write every search of the run to this file, then stop")
    p.add_argument("--replay", help="answer the searches from a --record file instead of the indexes")
    p.add_argument("--write-qa", help="also write the generated QA files (JSONL) into this folder")
    p.add_argument("--out", default=str(SCRATCH / "answer-kinds"))
    return p.parse_args(argv)


# -- the tasks --------------------------------------------------------------------------------------------
def wiki_rows() -> list[dict]:
    with open(WIKI, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def wiki_split(rows: list[dict], seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train:n_train + n_test]]


def topic_items(rows: list[dict], topics: tuple[str, ...]):
    from retro_peft.qa import QAItem

    return [QAItem(id=f"topic:{r['id']}", question=f"Which topic does the article about {r['title']} belong to?",
                   answers=(r["topic"],), gold_doc_ids=(r["id"],), kind="choice", choices=topics) for r in rows]


def describe_items(rows: list[dict]):
    from retro_peft.qa import QAItem

    return [QAItem(id=f"describe:{r['id']}", question=f"Describe {r['title']} in a few words.",
                   answers=(r["description"],), gold_doc_ids=(r["id"],), kind="free")
            for r in rows if r.get("description", "").strip()]


def tasks(args) -> dict:
    """task -> (train items, test items); plus the wiki split for the baselines."""
    from retro_peft.qa import load_qa

    rows = wiki_rows()
    topics = tuple(sorted({r["topic"] for r in rows}))
    train, test = wiki_split(rows, args.seed, args.n_train, args.n_test)
    out = {"topic": (topic_items(train, topics), topic_items(test, topics)),
           "describe": (describe_items(train), describe_items(test)),
           "squad": (load_qa(SQUAD, articles=TRAIN_ARTICLES), load_qa(SQUAD, articles=EVAL_ARTICLES)[:args.squad_limit])}
    return {name: out[name] for name in args.tasks.split(",")}, train


def write_qa(folder: Path, task_items: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (train, test) in task_items.items():
        for split, items in (("train", train), ("test", test)):
            with open(folder / f"{name}-{split}.jsonl", "w", encoding="utf-8") as f:
                for it in items:
                    row = {"id": it.id, "question": it.question, "answers": list(it.answers),
                           "gold_doc_ids": list(it.gold_doc_ids), "kind": it.kind}
                    if it.choices:
                        row["choices"] = list(it.choices)
                    if it.is_impossible:
                        row["is_impossible"] = True
                    f.write(json.dumps(row) + "\n")


# -- retrieval: the real indexes, or their recorded answers -----------------------------------------------
def open_indexes(names: set[str]) -> dict:
    from retro_peft.index import Document, IndexConfig, build_index, open_index

    out = {}
    if names & {"topic", "describe"}:
        path = SCRATCH / "index-wiki-leads"
        if not (path / "manifest.json").exists():
            print(f"building the index of the {len(wiki_rows())} leads at {path} ...", file=sys.stderr)
            docs = [Document(r["id"], r["text"], {"title": r["title"]}) for r in wiki_rows()]
            build_index(path, docs, IndexConfig(encoder="minilm"), overwrite=True)
        out["topic"] = out["describe"] = open_index(path)
    if "squad" in names:
        path = SCRATCH / "index-squad5"
        if not (path / "manifest.json").exists():
            build_index(path, [SQUAD], IndexConfig(encoder="minilm"), overwrite=True)
        out["squad"] = open_index(path)
    return out


class RecordingIndex:
    """Wraps a real index and keeps every search's hits (by query, k and mode) for `RecordedIndex`."""

    def __init__(self, index):
        self.index, self.searches = index, {}

    def __len__(self):
        return len(self.index)

    def chunks(self):
        return self.index.chunks()

    def search_many(self, queries, k=5, mode="hybrid", filters=None, **kw):
        hits = self.index.search_many(queries, k=k, mode=mode, filters=filters, **kw)
        for q, row in zip(queries, hits):
            self.searches[f"{mode}|{k}|{q}"] = [(h.chunk_id, h.score) for h in row]
        return hits

    def dump(self) -> dict:
        return {"chunks": [{"id": c.id, "doc_id": c.doc_id, "text": c.text, "metadata": c.metadata}
                           for c in self.index.chunks()], "searches": self.searches}


class RecordedIndex:
    """The recorded searches of a real index, answered again (same hits, same scores, same order)."""

    def __init__(self, data: dict):
        from retro_peft.index.chunking import Chunk

        self._chunks = [Chunk(c["id"], c["doc_id"], c["text"], c["metadata"]) for c in data["chunks"]]
        self._by_id = {c.id: c for c in self._chunks}
        self.searches = data["searches"]

    def __len__(self):
        return len(self._chunks)

    def chunks(self):
        return list(self._chunks)

    def search_many(self, queries, k=5, mode="hybrid", filters=None, **kw):
        from retro_peft.index.index import Hit

        out = []
        for q in queries:
            key = f"{mode}|{k}|{q}"
            if key not in self.searches:
                raise KeyError(f"search not recorded: {key!r} (record again with the same tasks and settings)")
            out.append([Hit(cid, self._by_id[cid].doc_id, self._by_id[cid].text, score, self._by_id[cid].metadata)
                        for cid, score in self.searches[key]])
        return out


# -- running a variant ------------------------------------------------------------------------------------
def retrieval_for(task: str, args, **overrides):
    from retro_peft.adapters import RetrievalConfig

    base = {"oracle_fraction": args.squad_oracle_fraction} if task == "squad" else {}
    return RetrievalConfig(**{**base, **overrides})


def load_base(args):
    from retro_peft.base_model import load_base_model

    model, tokenizer, _ = load_base_model(args.model, dtype=torch.float32, device=args.device)
    return model, tokenizer


def evaluate(model, tokenizer, index, retrieval, items, *, head=None):
    from retro_peft.generation import Generator
    from retro_peft.training import evaluate as run_eval

    start = time.perf_counter()
    generator = Generator(model, tokenizer, index=index, retrieval=retrieval, max_new_tokens=24, batch_size=16,
                          answerability=head)
    result = run_eval(generator, items)
    scores = result.summary()
    scores["eval_seconds"] = round(time.perf_counter() - start, 2)
    scores["abstained_any"] = sum(p["abstained"] for p in result.predictions) / max(len(result.predictions), 1)
    scores["examples"] = result.predictions[:3]
    return scores


def train_variant(args, task, retrieval, train_items, index, answer_rate=None):
    from retro_peft.adapters import RetroPeftModel, config_for_method
    from retro_peft.training import TrainConfig, build_examples, train
    from retro_peft.training.calibrate import calibrate, split_held_out

    base, tokenizer = load_base(args)
    model = RetroPeftModel.create(base, config_for_method("lora", retrieval=retrieval), tokenizer=tokenizer,
                                  seed=args.seed)
    held = None
    if answer_rate:
        train_items, held = split_held_out(train_items, seed=args.seed)
    examples = build_examples(train_items, index, tokenizer, retrieval, seed=args.seed)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=model.config.default_lr, seed=args.seed,
                         device=args.device, log_every=10)
    result = train(model, examples, config, progress=False)
    stats = {"train_seconds": round(result.seconds, 1), "tokens_per_s": round(result.tokens_per_s, 1),
             "final_loss": result.final_loss, "examples": len(examples),
             "targets_abstain": sum(ex.target == retrieval.abstention for ex in examples),
             "targets_with_markers": sum(bool(re.search(r"\[\d+\]$", ex.target)) for ex in examples)}
    heads = {}
    if held:
        start = time.perf_counter()
        model.answerability = calibrate(model.generator(index), held, answer_rate=answer_rate, seed=args.seed)
        stats["calibration"] = {"seconds": round(time.perf_counter() - start, 1),
                                "threshold": model.answerability.threshold, **model.answerability.stats}
        if args.head_variants:  # other heads on the same adapter: what the score's parts and data give
            from retro_peft.generation.answerability import fit_head, threshold_for
            from retro_peft.generation.prompt import encode
            from retro_peft.training.calibrate import answerability_features

            token = encode(model.tokenizer, retrieval.abstention)[0]
            generator = model.generator(index)
            held_x = answerability_features(generator, held)
            held_y = [it.answerable for it in held]
            train_x = answerability_features(generator, train_items)
            train_y = [it.answerable for it in train_items]
            fit = lambda x, y, **kw: fit_head(x, y, abstain_token=token, answer_rate=answer_rate,  # noqa: E731
                                              seed=args.seed, **kw)
            heads = {"margin_only": fit(held_x, held_y, hidden=False), "l2_1": fit(held_x, held_y, l2=1.0),
                     "l2_100": fit(held_x, held_y, l2=100.0)}
            # fitted on the adapter's own training questions too; the threshold still from the held-out scores
            both = fit(torch.cat([train_x, held_x]), train_y + held_y)
            cal = sorted(float(v) for v, a in zip(both.scores(held_x), held_y) if a)
            heads["with_training_questions"] = dataclasses.replace(both, calibration=cal,
                                                                   threshold=threshold_for(cal, answer_rate))
    return model, stats, heads


def baselines(task, train_rows, test_items, index) -> dict:
    golds = [it.answers[0] for it in test_items if it.answerable]
    if task == "topic":
        from retro_peft.training.evaluate import macro_f1

        majority = collections.Counter(golds).most_common(1)[0][0]
        known = {r["id"]: r["topic"] for r in train_rows}
        hits = index.search_many([it.question for it in test_items], k=10, mode="hybrid")
        votes = [collections.Counter(known[h.doc_id] for h in row if h.doc_id in known).most_common(1)
                 for row in hits]
        predicted = [v[0][0] if v else majority for v in votes]
        return {"majority": {"answer": majority, "accuracy": golds.count(majority) / len(golds),
                             "macro_f1": macro_f1([majority] * len(golds), golds)},
                "retrieval_only": {"accuracy": sum(p == g for p, g in zip(predicted, golds)) / len(golds),
                                   "macro_f1": macro_f1(predicted, golds)}}
    if task == "describe":
        from retro_peft.training.evaluate import rouge_l, token_f1

        hits = index.search_many([it.question for it in test_items], k=1, mode="hybrid")
        first = [re.split(r"(?<=[.!?])\s", row[0].text, maxsplit=1)[0] if row else "" for row in hits]
        return {"retrieval_only": {"token_f1": sum(token_f1(p, it.answers) for p, it in zip(first, test_items)) / len(golds),
                                   "rouge_l": sum(rouge_l(p, it.answers) for p, it in zip(first, test_items)) / len(golds)}}
    return {}


def run_task(args, task, train_items, test_items, index, train_rows) -> dict:
    variants = set(args.variants.split(","))
    report = {"n_train": len(train_items), "n_test": len(test_items), "variants": {}}
    if "baselines" in variants:
        report["baselines"] = baselines(task, train_rows, test_items, index)
    if "base" in variants:
        base, tokenizer = load_base(args)
        report["variants"]["base_retrieval"] = evaluate(base, tokenizer, index, retrieval_for(task, args), test_items)
        del base
    answer_rate = args.answer_rate if task == "squad" else None
    plan = [("span", retrieval_for(task, args, grounding="span", citations=False), None),
            ("doc" if task != "squad" else "auto", retrieval_for(task, args, grounding="doc" if task != "squad" else "auto"),
             answer_rate)]
    for name, retrieval, rate in plan:
        if name not in variants and not (name == "auto" and "doc" in variants):
            continue
        print(f"[{task}] training RetroLoRA grounding {name} ...", file=sys.stderr, flush=True)
        model, stats, heads = train_variant(args, task, retrieval, train_items, index, rate)
        label = f"retro_lora_{name}"
        stats.update(evaluate(model.model, model.tokenizer, index, retrieval, test_items))
        report["variants"][label] = stats
        if model.answerability is not None:
            report["variants"][label + "_calibrated"] = evaluate(model.model, model.tokenizer, index, retrieval,
                                                                 test_items, head=model.answerability)
        for head_name, head in heads.items():
            report["variants"][f"{label}_head_{head_name}"] = {
                "threshold": head.threshold, **head.stats,
                **evaluate(model.model, model.tokenizer, index, retrieval, test_items, head=head)}
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.device == "cuda" else 4)
    task_items, train_rows = tasks(args)
    if args.write_qa:
        write_qa(Path(args.write_qa), task_items)
    if args.replay:
        with gzip.open(args.replay, "rt", encoding="utf-8") as f:
            recorded = json.load(f)
        indexes = {name: RecordedIndex(recorded[name]) for name in task_items}
    else:
        indexes = open_indexes(set(task_items))
    if args.record:
        from retro_peft.training.data import BACKFILL

        data = {}
        for name, (train, test) in task_items.items():
            rec = RecordingIndex(indexes[name])
            retrieval = retrieval_for(name, args)
            for items in (train, test):
                questions = [it.question for it in items]
                for k in (retrieval.k, retrieval.k + BACKFILL, 10, 1):  # prompts, training's backfill, baselines
                    rec.search_many(questions, k=k, mode=retrieval.mode)
            data[name] = rec.dump()
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(args.record, "wt", encoding="utf-8") as f:
            json.dump(data, f)
        print(f"recorded {sum(len(d['searches']) for d in data.values())} searches in {args.record}")
        return 0
    report = {"model": args.model, "device": args.device, "machine": machine_summary(), "steps": args.steps,
              "batch_size": args.batch_size, "seed": args.seed, "torch": torch.__version__,
              "retrieval": "replayed from " + args.replay if args.replay else "live", "tasks": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (train, test) in task_items.items():
        report["tasks"][name] = run_task(args, name, train, test, indexes[name], train_rows)
        write_json(out / "answer-kinds.json", report)  # after each task: a cut-short run keeps what it finished
    plots.chart_beside(out / "answer-kinds.json", report, plots.quality)
    (out / "answer-kinds.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [f"{report['model']} on {report['device']}, {report['steps']} steps x batch {report['batch_size']}, "
             f"seed {report['seed']}, retrieval {report['retrieval']}", ""]
    cols = ["em", "f1", "accuracy", "macro_f1", "majority_accuracy", "token_f1", "rouge_l", "f1_answered",
            "abstain_unanswerable", "answer_answerable", "retrieval_recall", "citation_precision", "citation_recall"]
    for task, t in report["tasks"].items():
        lines += [f"### {task} (train {t['n_train']}, test {t['n_test']})", "",
                  "| variant | " + " | ".join(cols) + " | abstain targets | train s |",
                  "| --- |" + " ---: |" * (len(cols) + 2)]
        for name, v in t["variants"].items():
            lines.append(f"| {name} | " + " | ".join(pct(v.get(c)) for c in cols)
                         + f" | {v.get('targets_abstain', '-')} | {v.get('train_seconds', '-')} |")
        for name, b in (t.get("baselines") or {}).items():
            lines.append(f"| baseline: {name} | " + " | ".join(pct(b.get(c)) for c in cols) + " | - | - |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
