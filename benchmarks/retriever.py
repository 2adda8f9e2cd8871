"""Retriever training: the packaged encoder (MiniLM) against the same encoder fine-tuned on SQuAD questions.

    .venv/bin/python benchmarks/retriever.py --limit 16 --eval-limit 16      # smoke run (CPU, a minute or two)
    .venv/bin/python benchmarks/retriever.py --out benchmarks/results/retriever.json

- train: `train_retriever` (MultipleNegativesRankingLoss, mined hard negatives
  outside the gold paragraph, NO_DUPLICATES batches) on the answerable questions
  of the training articles 0-2 of ../shared/data/squad-v2-dev-5-articles.json,
  each paired with a chunk of its paragraph.
- corpus: the index of all 173 paragraphs (.bench/index-squad5, built with
  IndexConfig() if missing: MiniLM, 192-token chunks); a copy of it is
  re-embedded with the trained encoder (`Index.reembed`), the original is not touched.
- contextual chunks: the packaged encoder on an index of the same paragraphs built with
  `IndexConfig(context=("title",))` (each paragraph's article title embedded and BM25-indexed before it).
- evaluate: nDCG@10, recall@1 and recall@5 of the gold paragraph for the
  answerable questions of the unseen articles 3-4, dense and hybrid (weighted
  fusion, the default), packaged encoder vs trained; the training wall time
  (mining and saving included) and the re-embedding time.

Writes JSON only with --out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import SCRATCH, SQUAD, machine_info, print_json, timed

TRAIN_ARTICLES, EVAL_ARTICLES = slice(0, 3), slice(3, 5)
MODES = ("dense", "hybrid")
METRICS = ("ndcg@10", "recall@1", "recall@5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--squad", type=Path, default=SQUAD)
    p.add_argument("--index", type=Path, default=SCRATCH / "index-squad5", help="index folder (built if missing)")
    p.add_argument("--work", type=Path, default=SCRATCH / "retriever",
                   help="where the trained encoder and the re-embedded index copy go (replaced each run)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--hard-negatives", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="train on the first N questions of articles 0-2 (default: all)")
    p.add_argument("--eval-limit", type=int, help="evaluate the first N questions of articles 3-4 (default: all)")
    p.add_argument("--lsr", action="store_true",
                   help="also train with LM supervision (REPLUG's LSR) with the base generator (--model)")
    p.add_argument("--model", default="smollm2-135m", help="--lsr: the generator that scores the chunks")
    p.add_argument("--out", type=Path, help="write the results as JSON here (e.g. benchmarks/results/retriever.json)")
    return p.parse_args(argv)


def scores(index, items) -> dict:
    from retro_peft.index import evaluate_retrieval

    report = evaluate_retrieval(index, items, modes=MODES)
    return {mode: {m: report[mode][m] for m in METRICS} for mode in MODES}


def main(argv=None) -> int:
    args = parse_args(argv)
    from retro_peft.index import IndexConfig, build_index, open_index
    from retro_peft.index.retriever import RetrieverTrainConfig, train_retriever
    from retro_peft.qa import load_qa

    if not (args.index / "manifest.json").exists():
        print(f"building the index of every paragraph of {args.squad} at {args.index} ...", file=sys.stderr)
        build_index(args.index, [args.squad], IndexConfig(), overwrite=True)
    index = open_index(args.index)
    train = [it for it in load_qa(args.squad, articles=TRAIN_ARTICLES) if it.answerable][: args.limit]
    test = [it for it in load_qa(args.squad, articles=EVAL_ARTICLES) if it.answerable][: args.eval_limit]

    packaged = scores(index, test)
    # contextual chunks: the same corpus with each paragraph's article title indexed before its text
    contextual_path = args.work / "index-contextual"
    contextual_seconds, contextual_index = timed(build_index, contextual_path, [args.squad],
                                                 IndexConfig(context=("title",)), overwrite=True)
    contextual = scores(contextual_index, test)
    config = RetrieverTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  hard_negatives=args.hard_negatives, seed=args.seed)
    encoder_dir, copy = args.work / "encoder", args.work / "index"
    train_seconds, summary = timed(train_retriever, index, train, encoder_dir, config, overwrite=True)
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(args.index, copy)
    reembed_seconds, stats = timed(open_index(copy).reembed, str(encoder_dir))
    trained = scores(open_index(copy), test)

    lsr = None
    if args.lsr:
        import torch

        from retro_peft.base_model import load_base_model
        from retro_peft.generation import Generator
        from retro_peft.training.lsr import LSRConfig, train_retriever_lsr

        model, tokenizer, _ = load_base_model(args.model, dtype=torch.float32, device="cpu")
        generator = Generator(model, tokenizer, index=index, batch_size=8)
        lsr_dir, lsr_copy = args.work / "encoder-lsr", args.work / "index-lsr"
        lsr_summary = train_retriever_lsr(generator, index, train, lsr_dir, LSRConfig(seed=args.seed), overwrite=True)
        if lsr_copy.exists():
            shutil.rmtree(lsr_copy)
        shutil.copytree(args.index, lsr_copy)
        open_index(lsr_copy).reembed(str(lsr_dir))
        lsr = {"summary": lsr_summary, "scores": scores(open_index(lsr_copy), test)}

    results = {
        "machine": machine_info(),
        "data": {"squad": args.squad.name, "corpus_chunks": len(index), "index": str(args.index),
                 "train_articles": "0-2", "train_questions": len(train), "train_pairs": summary["pairs"],
                 "eval_articles": "3-4", "eval_questions": len(test)},
        "config": summary["config"],
        "training": {"seconds": round(train_seconds, 2), "steps": summary["steps"], "loss": summary["loss"]},
        "reembed": {"seconds": round(reembed_seconds, 2), "chunks": stats["chunks"], "embedded": stats["embedded"]},
        "packaged": packaged,
        "packaged_contextual": contextual,
        "contextual_build_seconds": round(contextual_seconds, 2),
        "trained": trained,
        "lsr": lsr,
        "delta": {mode: {m: round(trained[mode][m] - packaged[mode][m], 4) for m in METRICS} for mode in MODES},
    }
    print_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
