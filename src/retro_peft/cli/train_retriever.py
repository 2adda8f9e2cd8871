"""`retro-peft train-retriever`: fine-tune an index's encoder on a QA file's questions (contrastive, or
LM-supervised: the generator's likelihood of each question's answer with each retrieved chunk)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from retro_peft.choices import RETRIEVER_SUPERVISIONS
from retro_peft.cli import given
from retro_peft.errors import InputError
from retro_peft.models import DEFAULT_GENERATOR



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
    p.add_argument("--supervision", choices=RETRIEVER_SUPERVISIONS, default=RETRIEVER_SUPERVISIONS[0],
                   help="contrastive (question -> its gold chunk) or lsr (match the generator's preference among "
                        "the top-k chunks: REPLUG's LM-supervised retrieval)")
    p.add_argument("--model", default=DEFAULT_GENERATOR, help="lsr: the generator's base model")
    p.add_argument("--adapter", help="lsr: the generator's adapter (a RetroLoRA folder), else the base model")
    p.add_argument("--k", type=int, help="lsr: chunks per question (default: 4)")
    p.add_argument("--device", help="lsr: cpu or cuda for the generator (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already at --out")
    p.set_defaults(func=_train_retriever)


def _train_retriever(args) -> int:
    from retro_peft.cli.train import parse_articles
    from retro_peft.index import open_index
    from retro_peft.index.retriever import RetrieverTrainConfig, check_output_folder, train_retriever
    from retro_peft.qa import load_qa

    if args.supervision == "lsr":
        from retro_peft.training.lsr import LSRConfig

        if args.hard_negatives is not None or args.max_seq_length is not None:
            raise InputError("--hard-negatives and --max-seq-length belong to --supervision contrastive")
        config = LSRConfig(**given(args, "epochs", "batch_size", "lr", "seed", "k"))
    else:
        if args.adapter or args.k is not None:
            raise InputError("--adapter and --k belong to --supervision lsr")
        config = RetrieverTrainConfig(**given(args, "epochs", "batch_size", "lr", "hard_negatives",
                                              "max_seq_length", "seed"))
    config.validate()
    check_output_folder(Path(args.out), args.overwrite)  # before the index and the QA file are read
    items = load_qa(args.qa, articles=parse_articles(args.articles))
    index = open_index(args.index)
    with contextlib.redirect_stdout(sys.stderr):  # the libraries' progress output; stdout carries the JSON
        if args.supervision == "lsr":
            summary = _lsr(args, index, items, config)
        else:
            summary = train_retriever(index, items, args.out, config, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


def _lsr(args, index, items, config) -> dict:
    from retro_peft.adapters import RetroPeftModel
    from retro_peft.base_model import check_device, inference_dtype, load_base_model
    from retro_peft.generation import Generator
    from retro_peft.training.lsr import train_retriever_lsr

    device = str(check_device(args.device))
    if args.adapter:
        generator = RetroPeftModel.load(args.adapter, base_model=args.model, dtype=inference_dtype(device, "auto"),
                                        device=device).generator(index)
    else:
        model, tokenizer, _ = load_base_model(args.model, dtype=inference_dtype(device, "auto"), device=device)
        generator = Generator(model, tokenizer, index=index)
    return train_retriever_lsr(generator, index, items, args.out, config, overwrite=args.overwrite)
