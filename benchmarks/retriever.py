"""Retriever training: the packaged encoder (MiniLM) against the same encoder fine-tuned on the task's questions.

    .venv/bin/python benchmarks/retriever.py --limit 16 --eval-limit 16      # smoke run (CPU, a minute or two)
    .venv/bin/python benchmarks/retriever.py --lsr --out benchmarks/results/retriever-cpu.json
    python benchmarks/retriever.py --task wiki --out wiki.json                 # GPU (10k leads to embed)
    python benchmarks/retriever.py --lsr --e2e --out squad-e2e.json            # GPU (four RetroLoRA runs)

--task squad (default):
- train: `train_retriever` (MultipleNegativesRankingLoss, mined hard negatives
  outside the gold paragraph, NO_DUPLICATES batches) on the answerable questions
  of the training articles 0-2 of ../shared/data/squad-v2-dev-5-articles.json,
  each paired with a chunk of its paragraph; --lsr also REPLUG's LSR with the base
  generator (--model) scoring each question's top 4 chunks.
- corpus: the index of all 173 paragraphs (.bench/index-squad5, built with
  IndexConfig() if missing: MiniLM, 192-token chunks); a copy of it is
  re-embedded with each trained encoder (`Index.reembed`), the original is not touched.
- contextual chunks: the packaged encoder on an index of the same paragraphs built with
  `IndexConfig(context=("title",))` (each paragraph's article title embedded and BM25-indexed before it).
- evaluate: nDCG@10, recall@1 and recall@5 of the gold paragraph for the
  answerable questions of the unseen articles 3-4, dense and hybrid (weighted
  fusion, the default), packaged encoder vs trained; the training wall time
  (mining and saving included) and the re-embedding time.
- --e2e: RetroLoRA (quality.py's variant (d) recipe: --steps, k 3, 1 distractor, P 0.8, 700-token
  budget) trained and evaluated (F1 on articles 3-4) with each retriever's index, and a joint run
  (`train(..., retriever=RetrieverObjective(contrastive))`: adapter and encoder in the same steps, the
  index copy re-embedded at the end) scored both ways.

--task wiki: the description-to-article task of ../shared/data/wikipedia-vital-10k-en.jsonl
  (corpus: all 10,033 leads; query: an article's description, common.wiki_query), split as the
  routing benchmark splits it (common.is_tuning: sha256 of the article id): train on the tuning
  half's queries, report the test half. Rows: packaged, contextual (title), contrastive. LSR and
  joint training need answers for the generator to score; this task has none. The trained encoder
  stays at WORK/encoder for `benchmarks/routing.py --encoder WORK/encoder`.

Writes JSON only with --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import plots
from common import SCRATCH, SQUAD, is_tuning, machine_info, print_json, timed, wiki_data

TRAIN_ARTICLES, EVAL_ARTICLES = slice(0, 3), slice(3, 5)
MODES = ("dense", "hybrid")
METRICS = ("ndcg@10", "recall@1", "recall@5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("squad", "wiki"), default="squad")
    p.add_argument("--squad", type=Path, default=SQUAD)
    p.add_argument("--index", type=Path, help="the packaged encoder's index (built if missing; default: "
                                              ".bench/index-squad5, or .bench/index-wiki-leads for --task wiki)")
    p.add_argument("--work", type=Path, default=SCRATCH / "retriever",
                   help="where the trained encoders and the re-embedded index copies go (replaced each run)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--hard-negatives", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="train on the first N training questions (default: all)")
    p.add_argument("--eval-limit", type=int, help="evaluate the first N test questions (default: all)")
    p.add_argument("--corpus-limit", type=int, help="wiki: the first N leads only (a smoke run; give --index too)")
    p.add_argument("--lsr", action="store_true",
                   help="squad: also train with LM supervision (REPLUG's LSR) with the base generator (--model)")
    p.add_argument("--model", default="smollm2-135m", help="--lsr, --e2e: the generator")
    p.add_argument("--e2e", action="store_true", help="squad: RetroLoRA F1 with each retriever, and joint training")
    p.add_argument("--steps", type=int, default=300, help="--e2e: RetroLoRA steps")
    p.add_argument("--e2e-runs", default="packaged,contrastive,lsr,joint",
                   help="--e2e: which runs (packaged, contrastive, lsr: RetroLoRA with that retriever's index; joint)")
    p.add_argument("--device", help="--e2e, --lsr: cpu or cuda (default: cuda if available)")
    p.add_argument("--out", type=Path, help="write the results as JSON here (e.g. benchmarks/results/retriever.json)")
    return p.parse_args(argv)


def scores(index, items) -> dict:
    from retro_peft.index import evaluate_retrieval

    report = evaluate_retrieval(index, items, modes=MODES)
    return {mode: {m: report[mode][m] for m in METRICS} for mode in MODES}


def reembedded_copy(source: Path, copy: Path, encoder_dir: Path):
    """A copy of the index at `source`, re-embedded with `encoder_dir`: (seconds, stats, index)."""
    from retro_peft.index import open_index

    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(source, copy)
    seconds, stats = timed(open_index(copy).reembed, str(encoder_dir))
    return seconds, stats, open_index(copy)


def main(argv=None) -> int:
    args = parse_args(argv)
    from retro_peft.index import IndexConfig, build_index, open_index
    from retro_peft.index.retriever import RetrieverTrainConfig, train_retriever
    from retro_peft.qa import load_qa

    if args.task == "wiki":
        docs, queries = wiki_data(args.corpus_limit)
        inputs = docs
        train = [q for q in queries if is_tuning(q.id)][: args.limit]
        test = [q for q in queries if not is_tuning(q.id)][: args.eval_limit]
        args.index = args.index or SCRATCH / "index-wiki-leads"
        data = {"task": "wikipedia description -> article", "corpus_documents": len(docs),
                "split": "common.is_tuning (sha256 of the article id): train on tuning, report test"}
    else:
        inputs = [args.squad]
        train = [it for it in load_qa(args.squad, articles=TRAIN_ARTICLES) if it.answerable][: args.limit]
        test = [it for it in load_qa(args.squad, articles=EVAL_ARTICLES) if it.answerable][: args.eval_limit]
        args.index = args.index or SCRATCH / "index-squad5"
        data = {"task": "squad", "squad": args.squad.name, "train_articles": "0-2", "eval_articles": "3-4"}
    if not (args.index / "manifest.json").exists():
        print(f"building the index of the {args.task} corpus at {args.index} ...", file=sys.stderr)
        build_index(args.index, inputs, IndexConfig(), overwrite=True)
    index = open_index(args.index)

    packaged = scores(index, test)
    # contextual chunks: the same corpus with each document's title indexed before its text
    contextual_seconds, contextual_index = timed(build_index, args.work / "index-contextual", inputs,
                                                 IndexConfig(context=("title",)), overwrite=True)
    contextual = scores(contextual_index, test)
    config = RetrieverTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  hard_negatives=args.hard_negatives, seed=args.seed)
    encoder_dir = args.work / "encoder"
    train_seconds, summary = timed(train_retriever, index, train, encoder_dir, config, overwrite=True)
    reembed_seconds, stats, trained_index = reembedded_copy(args.index, args.work / "index", encoder_dir)
    trained = scores(trained_index, test)

    lsr = lsr_index = None
    if args.lsr and args.task == "squad":
        lsr, lsr_index = train_lsr(args, index, train, test)

    e2e = None
    if args.e2e and args.task == "squad":
        runs = set(args.e2e_runs.split(","))
        e2e = end_to_end(args, {name: ix for name, ix in (("packaged", index), ("contrastive", trained_index),
                                                          ("lsr", lsr_index)) if name in runs}, joint="joint" in runs)

    results = {
        "machine": machine_info(),
        "data": {**data, "corpus_chunks": len(index), "index": str(args.index), "train_questions": len(train),
                 "train_pairs": summary["pairs"], "eval_questions": len(test)},
        "config": summary["config"],
        "training": {"seconds": round(train_seconds, 2), "steps": summary["steps"], "loss": summary["loss"]},
        "reembed": {"seconds": round(reembed_seconds, 2), "chunks": stats["chunks"], "embedded": stats["embedded"]},
        "packaged": packaged,
        "packaged_contextual": contextual,
        "contextual_build_seconds": round(contextual_seconds, 2),
        "trained": trained,
        "lsr": lsr,
        "e2e": e2e,
        "delta": {mode: {m: round(trained[mode][m] - packaged[mode][m], 4) for m in METRICS} for mode in MODES},
        "encoder_dir": str(encoder_dir),
    }
    print_json(results, args.out)
    if args.out:
        plots.chart_beside(args.out, results, plots.retrieval)
    return 0


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def train_lsr(args, index, train, test):
    import torch

    from retro_peft.base_model import load_base_model
    from retro_peft.generation import Generator
    from retro_peft.training.lsr import LSRConfig, train_retriever_lsr

    device = _device(args)
    model, tokenizer, _ = load_base_model(args.model, dtype=torch.float32 if device == "cpu" else torch.bfloat16,
                                          device=device)
    generator = Generator(model, tokenizer, index=index, batch_size=8)
    lsr_dir = args.work / "encoder-lsr"
    summary = train_retriever_lsr(generator, index, train, lsr_dir, LSRConfig(seed=args.seed), overwrite=True)
    del model, generator
    _, _, lsr_index = reembedded_copy(args.index, args.work / "index-lsr", lsr_dir)
    return {"summary": summary, "scores": scores(lsr_index, test)}, lsr_index


def end_to_end(args, indexes: dict, joint: bool = True) -> dict:
    """RetroLoRA trained and scored with each retriever's index (quality.py's recipe), then a joint run."""
    import quality

    from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
    from retro_peft.qa import load_qa
    from retro_peft.training import TrainConfig, build_examples
    from retro_peft.training import train as train_adapter
    from retro_peft.training.joint import JointRetrieverConfig, RetrieverObjective

    device = _device(args)
    qargs = quality.parse_args(["--model", args.model, "--squad", str(args.squad), "--steps", str(args.steps),
                                "--device", device, "--seed", str(args.seed)])
    qargs.batch_size = 8 if device == "cuda" else 4
    train_items = load_qa(args.squad, articles=TRAIN_ARTICLES)[: args.limit]
    eval_items = load_qa(args.squad, articles=EVAL_ARTICLES)[: args.eval_limit]
    retrieval = RetrievalConfig(k=qargs.k, distractors=qargs.distractors, oracle_fraction=qargs.oracle_fraction,
                                context_tokens=qargs.context_tokens)
    base_factory = lambda: quality.load_base(qargs)  # noqa: E731  (each run starts from fresh base weights)
    keys = ("em", "f1", "f1_answered", "answer_answerable", "abstain_unanswerable", "retrieval_recall")
    out = {"recipe": {"steps": args.steps, "batch_size": qargs.batch_size, "retrieval": dataclasses.asdict(retrieval),
                      "n_train": len(train_items), "n_eval": len(eval_items), "seed": args.seed}}
    for name, index in indexes.items():
        if index is None:
            continue
        model, stats, _ = quality.train_variant(qargs, "lora", retrieval, train_items, index, base_factory)
        got = quality.evaluate_variant(model.model, model.tokenizer, index, retrieval, eval_items, closed_book=False)
        out[name] = {k: got.get(k) for k in keys} | {"train_seconds": stats["train_seconds"]}
        print(f"e2e {name}: F1 {got['f1']:.4f}", file=sys.stderr)
        del model

    if not joint:
        return out
    # joint: the adapter and a copy of the packaged encoder in the same steps; the index copy re-embedded
    joint_index_path = args.work / "index-joint"
    if joint_index_path.exists():
        shutil.rmtree(joint_index_path)
    shutil.copytree(args.index, joint_index_path)
    from retro_peft.index import open_index

    joint_index = open_index(joint_index_path)
    answerable = [it for it in train_items if it.answerable]
    objective = RetrieverObjective(joint_index, answerable, JointRetrieverConfig(seed=args.seed))
    base, tokenizer, name = base_factory()
    config = config_for_method("lora", retrieval=retrieval, steps=args.steps)
    model = RetroPeftModel.create(base, config, tokenizer=tokenizer, seed=args.seed)
    model.base_model_name = name
    examples = build_examples(train_items, joint_index, tokenizer, retrieval, seed=args.seed)
    adapter_dir = args.work / "adapter-joint"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    result = train_adapter(model, examples, TrainConfig(steps=args.steps, batch_size=qargs.batch_size,
                                                        lr=config.default_lr, seed=args.seed, device=device),
                           out_dir=adapter_dir, index=joint_index, progress=False, retriever=objective)
    joint_index = open_index(joint_index_path)  # as re-embedded
    got = quality.evaluate_variant(model.model, model.tokenizer, joint_index, retrieval, eval_items, closed_book=False)
    test = [it for it in eval_items if it.answerable]
    out["joint"] = {k: got.get(k) for k in keys} | {
        "train_seconds": round(result.seconds, 2), "retriever_losses": result.retriever_losses[-3:],
        "reembedded": result.reembedded, "retrieval": scores(joint_index, test)}
    print(f"e2e joint: F1 {got['f1']:.4f}", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
