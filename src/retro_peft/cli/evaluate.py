"""`retro-peft eval`: answer questions with a base model or an adapter, and score them."""

from __future__ import annotations

import json
import os

from retro_peft.choices import ANSWER_KINDS, DTYPE_NAMES
from retro_peft.cli import (abstain_at, add_answer_arguments, add_kv_cache_arguments, add_progress_argument,
                            add_quantize_argument, given, show_progress)
from retro_peft.errors import InputError
from retro_peft.models import DEFAULT_GENERATOR


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate answers: EM/F1 (span), accuracy/macro-F1 (choice), token F1/ROUGE-L "
                                    "(free), abstention, retrieval recall, citation precision/recall")
    p.add_argument("--model", default=DEFAULT_GENERATOR, help=f"base model: {DEFAULT_GENERATOR}, a local folder or a HF id")
    p.add_argument("--adapter", help="adapter folder written by `retro-peft train`")
    p.add_argument("--index", help="index name or path (required unless --no-retrieval)")
    p.add_argument("--qa", required=True, help="questions: JSONL or SQuAD JSON")
    p.add_argument("--articles", help="SQuAD articles to evaluate on, e.g. 3:5")
    p.add_argument("--no-retrieval", action="store_true", help="closed book: no passages in the prompt")
    p.add_argument("--limit", type=int, help="evaluate the first N questions")
    p.add_argument("--k", type=int, help="passages per prompt (default: the adapter's, else 3)")
    p.add_argument("--context-tokens", type=int, help="prompt budget in tokens (default: the adapter's, else 700)")
    p.add_argument("--batch-size", type=int, help="questions per decode pass (default: Generator's)")
    p.add_argument("--max-new-tokens", type=int, help="answer length bound (default: Generator's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="auto: bfloat16 on CUDA, float32 on a CPU (bfloat16 halves CPU prefill where the CPU has "
                        "native bf16, e.g. AVX512-BF16)")
    add_quantize_argument(p, "the adapter, trained on either base, answers on it")
    p.add_argument("--kind", choices=ANSWER_KINDS, help="answer kind of questions that name none")
    add_answer_arguments(p, "default: questions that name none answer freely", "the rate the head was calibrated for")
    add_kv_cache_arguments(p)
    p.add_argument("--predictions", help="also write every prediction to this JSONL file")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from retro_peft.adapters import RetrievalConfig, RetroPeftModel
    from retro_peft.adapters.model import check_index, read_retro_config
    from retro_peft.base_model import check_device, inference_dtype, load_base_model
    from retro_peft.choices import check_quantize, check_quantize_skip
    from retro_peft.cli.train import parse_articles
    from retro_peft.generation import Generator
    from retro_peft.index import open_index
    from retro_peft.qa import load_qa
    from retro_peft.storage import atomic_write_bytes, check_output_file
    from retro_peft.training import evaluate

    device = str(check_device(args.device))
    check_quantize(args.quantize)  # bitsandbytes missing: the pip command before anything is read
    quantize_skip = check_quantize_skip(args.quantize, args.quantize_skip or ())
    if args.predictions:  # else a bad path fails only after the whole evaluation
        check_output_file(args.predictions, "--predictions")
    if args.kv_cache and not os.path.exists(args.kv_cache):  # it will be built and written there
        check_output_file(args.kv_cache, "--kv-cache")
    if args.kv_layout and not args.kv_cache:
        raise InputError("--kv-layout says how to use a frozen KV cache: it needs --kv-cache FILE")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be positive, got {args.limit}")
    if not args.no_retrieval and not args.index:
        raise InputError("--index is required (or pass --no-retrieval for closed-book answers)")
    answer_rate = abstain_at(args)
    items = load_qa(args.qa, articles=parse_articles(args.articles), kind=args.kind, choices=args.choices)
    info = read_retro_config(args.adapter) if args.adapter else None
    index = open_index(args.index) if args.index and not args.no_retrieval else None
    if info and index is not None:
        check_index(info, index)
    dtype = inference_dtype(device, args.dtype)
    if args.adapter:
        model = RetroPeftModel.load(args.adapter, base_model=args.model, dtype=dtype, device=device,
                                    quantize=args.quantize, quantize_skip=quantize_skip)
        lm, tokenizer, retrieval = model.model, model.tokenizer, model.retrieval
        if answer_rate and model.answerability is None:
            raise InputError(f"adapter {args.adapter} has no calibrated answerability head (train it with "
                             "--abstain-at answer_rate=R); --abstain-at needs one")
        head = model.answerability.at_rate(answer_rate) if model.answerability is not None else None
        soft = model.soft_tokens
    else:
        if answer_rate:
            raise InputError("--abstain-at uses an adapter's calibrated answerability head: give --adapter")
        head = None
        lm, tokenizer, _ = load_base_model(args.model, dtype=dtype, device=device, quantize=args.quantize,
                                           quantize_skip=quantize_skip)
        retrieval, soft = RetrievalConfig(), None
    overrides = {k: v for k, v in (("k", args.k), ("context_tokens", args.context_tokens)) if v is not None}
    retrieval = dataclasses.replace(retrieval, **overrides)
    kv_cache = None
    if args.kv_cache:
        if index is None:
            raise InputError("--kv-cache stores passage states: it needs --index (and retrieval)")
        from retro_peft.kvcache import load_or_build

        kv_cache = load_or_build(args.kv_cache, lm, tokenizer, index, retrieval, layout=args.kv_layout,
                                 progress=show_progress(args), soft=soft)
    generator = Generator(lm, tokenizer, index=index, retrieval=retrieval, kv_cache=kv_cache, answerability=head,
                          **given(args, "max_new_tokens", "batch_size"))
    result = evaluate(generator, items, retrieval=not args.no_retrieval, limit=args.limit,
                      progress=show_progress(args))
    if args.predictions:
        atomic_write_bytes(args.predictions, "".join(json.dumps(p) + "\n" for p in result.predictions).encode())
    scores = result.summary()
    if args.json:
        print(json.dumps(scores))
    else:
        for key, value in scores.items():
            if value is not None:  # the scores of other answer kinds are None
                print(f"{key:22s} {value if isinstance(value, (int, str)) else f'{value:.4f}'}")
    return 0
