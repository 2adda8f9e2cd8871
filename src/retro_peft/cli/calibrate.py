"""`retro-peft calibrate`: refit an adapter's answerability head in the layout it will answer in."""

from __future__ import annotations

import json

from retro_peft.cli import abstain_at, add_kv_cache_arguments, add_progress_argument, show_progress
from retro_peft.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit an adapter's answerability head on held-out questions, in the layout "
                                         "it answers in (full prefill, or through a frozen KV cache)")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder written by `retro-peft train`")
    p.add_argument("--index", required=True, help="the index the adapter answers from")
    p.add_argument("--qa", required=True, help="held-out questions (answerable and unanswerable), JSONL or SQuAD "
                                               "JSON: not the ones it was trained on")
    p.add_argument("--articles", help="SQuAD articles to calibrate on, e.g. 2")
    p.add_argument("--abstain-at", required=True, metavar="answer_rate=R",
                   help="the head abstains below the score that answers R of the answerable questions")
    add_kv_cache_arguments(p)
    p.add_argument("--out", required=True, help="the calibrated copy of the adapter folder (refused if it exists, "
                                                "unless --overwrite; ADAPTER itself with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from retro_peft.adapters import RetroPeftModel
    from retro_peft.adapters.model import check_index, read_retro_config, save_with_head
    from retro_peft.base_model import check_device, inference_dtype
    from retro_peft.cli.train import parse_articles, qa_digest
    from retro_peft.index import open_index
    from retro_peft.qa import load_qa
    from retro_peft.storage import check_output_file
    from retro_peft.training.calibrate import calibrate

    # every check that can fail runs before the model is loaded
    answer_rate = abstain_at(args)
    if not answer_rate:
        raise InputError("--abstain-at: give the answer rate to calibrate for (answer_rate=R, 0 < R <= 1)")
    if args.kv_layout and not args.kv_cache:
        raise InputError("--kv-layout says how to use a frozen KV cache: it needs --kv-cache FILE")
    if args.kv_cache and not os.path.exists(args.kv_cache):  # it will be built and written there
        check_output_file(args.kv_cache, "--kv-cache")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} exists: choose another --out, or --overwrite to replace it")
    info = read_retro_config(args.adapter)
    items = load_qa(args.qa, articles=parse_articles(args.articles))
    index = open_index(args.index)
    check_index(info, index)
    device = str(check_device(args.device))
    model = RetroPeftModel.load(args.adapter, dtype=inference_dtype(device, "auto"), device=device)
    cache = None
    if args.kv_cache:
        from retro_peft.kvcache import load_or_build

        cache = load_or_build(args.kv_cache, model.model, model.tokenizer, index, model.retrieval,
                              layout=args.kv_layout, progress=show_progress(args), soft=model.soft_tokens)
    generator = model.generator(index, kv_cache=cache)
    head = calibrate(generator, items, answer_rate=answer_rate)
    record = {"qa_sha256": qa_digest(args.qa, args.articles),
              "questions": len(items), "answer_rate": answer_rate, "layout": head.layout,
              "kv_cache": str(Path(args.kv_cache).absolute()) if args.kv_cache else None}
    save_with_head(args.adapter, head, out, record=record, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "layout": head.layout, "answer_rate": head.answer_rate,
                      "threshold": head.threshold, **head.stats}, indent=2))
    return 0
