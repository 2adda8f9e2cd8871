"""`retro-peft train-retriever`: fine-tune an index's encoder on a QA file's questions (contrastive)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from retro_peft.cli import given


def register(sub) -> None:
    p = sub.add_parser("train-retriever",
                       help="fine-tune an index's encoder on questions and their gold documents (contrastive)")
    p.add_argument("--index", required=True, help="index name or path: its encoder is trained, its chunks are the "
                                                  "positives and hard negatives")
    p.add_argument("--qa", required=True, help="training questions with gold_doc_ids: JSONL or SQuAD JSON")
    p.add_argument("--articles", help="SQuAD articles to train on, e.g. 0:3")
    p.add_argument("--out", required=True, help="output folder: a sentence-transformers model "
                                                "(then `retro-peft index reembed NAME --encoder OUT`)")
    # Options without a default here take RetrieverTrainConfig's (`retro_peft.cli.given`).
    p.add_argument("--epochs", type=int, help="passes over the pairs (default: 1)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="pairs per batch (default: 32)")
    p.add_argument("--lr", type=float, help="learning rate (default: 2e-5)")
    p.add_argument("--hard-negatives", dest="hard_negatives", type=int,
                   help="mined negatives per question (default: 1; 0: in-batch negatives only)")
    p.add_argument("--max-seq-length", dest="max_seq_length", type=int, help="truncate texts to this many tokens")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already at --out")
    p.set_defaults(func=_train_retriever)


def _train_retriever(args) -> int:
    from retro_peft.cli.train import parse_articles
    from retro_peft.index import open_index
    from retro_peft.index.retriever import RetrieverTrainConfig, check_output_folder, train_retriever
    from retro_peft.qa import load_qa

    config = RetrieverTrainConfig(**given(args, "epochs", "batch_size", "lr", "hard_negatives", "max_seq_length",
                                          "seed"))
    config.validate()
    check_output_folder(Path(args.out), args.overwrite)  # before the index and the QA file are read
    items = load_qa(args.qa, articles=parse_articles(args.articles))
    index = open_index(args.index)
    with contextlib.redirect_stdout(sys.stderr):  # the libraries' progress output; stdout carries the JSON
        summary = train_retriever(index, items, args.out, config, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0
