"""`retro-peft train`: train a retrieval-augmented adapter (RetroLoRA, RetroAdaLoRA, RetroIA3)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from retro_peft.choices import ANSWER_KINDS, GROUNDINGS, PEFT_METHODS, RETRIEVER_SUPERVISIONS, SEARCH_MODES
from retro_peft.cli import abstain_at, add_progress_argument, add_quantize_argument, given, parse_choices, show_progress
from retro_peft.errors import InputError
from retro_peft.models import DEFAULT_GENERATOR


def parse_articles(text: str | None) -> slice | None:
    """`0:3` -> slice(0, 3); `4` -> slice(4, 5); None -> every article."""
    if not text:
        return None
    try:
        if ":" in text:
            start, stop = text.split(":", 1)
            return slice(int(start) if start else None, int(stop) if stop else None)
        return slice(int(text), int(text) + 1)
    except ValueError:
        raise InputError(f"--articles must look like 0:3 or 4, got {text!r}") from None


def checkpointing_option(text: str) -> float | str:
    """--gradient-checkpointing's value: a fraction of the layers, or 'selective'."""
    if text == "selective":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fraction of the layers (0 to 1) or 'selective', got {text!r}") from None


def qa_digest(qa: str, articles: str | None) -> str:
    """What a run read its questions from: the file's bytes and the articles taken from it."""
    from retro_peft.storage import sha256_file

    return hashlib.sha256(f"{sha256_file(Path(qa))}:{articles or ''}".encode()).hexdigest()


def register(sub) -> None:
    p = sub.add_parser("train", help="train a retrieval-augmented PEFT adapter")
    p.add_argument("--model", help=f"base model: {DEFAULT_GENERATOR} (the default), a local folder or a HF id")
    p.add_argument("--index", required=True, help="index name or path (see `retro-peft index build`)")
    p.add_argument("--qa", required=True, help="training questions: JSONL or SQuAD JSON")
    p.add_argument("--articles", help="SQuAD articles to train on, e.g. 0:3")
    p.add_argument("--method", choices=PEFT_METHODS, help=f"default: {PEFT_METHODS[0]}, or --from-adapter's")
    p.add_argument("--from-adapter", metavar="DIR",
                   help="start from this trained adapter's weights (on its base model) instead of a fresh one, "
                        "e.g. a full-attention adapter continued with --block-attention --distill")
    p.add_argument("--out", required=True, help="output folder: the adapter, and checkpoints/ while training")
    # Options without a default here take RetrievalConfig's and TrainConfig's (`retro_peft.cli.given`).
    p.add_argument("--steps", type=int, help="optimizer steps (default: TrainConfig.steps; with --block-attention "
                   "--from-adapter and no --soft-tokens, as many as that adapter trained)")
    p.add_argument("--k", type=int, help="retrieved passages per prompt (default: RetrievalConfig.k)")
    p.add_argument("--distractors", type=int, help="random passages from other documents per prompt")
    p.add_argument("--oracle-fraction", type=float, help="P: share of answerable examples that keep the gold passage")
    p.add_argument("--context-tokens", type=int, help="prompt budget in tokens")
    p.add_argument("--mode", choices=SEARCH_MODES, help="search mode (default: RetrievalConfig.mode)")
    p.add_argument("--block-attention", action="store_true",
                   help="train in the frozen KV cache's layout (each passage computed apart, whole passages), "
                        "for an adapter that answers through `eval --kv-cache`")
    p.add_argument("--distill", type=float, metavar="WEIGHT",
                   help="with --block-attention: also train each example's full-prefill copy and pull the cached "
                        "layout's answer distribution to it (KL, this weight); best with --from-adapter")
    p.add_argument("--soft-tokens", type=int, metavar="N",
                   help="with --block-attention and --from-adapter: train N soft tokens stored after each passage of "
                        "the frozen KV cache (KV Packet), the adapter frozen, by distillation toward its full "
                        "prefill; saved in the adapter folder")
    p.add_argument("--grounding", choices=GROUNDINGS,
                   help="which passages are a question's gold ones: doc (its gold documents' chunks), span (chunks "
                        "holding the answer's words), auto (doc where the question names gold documents; default)")
    p.add_argument("--no-citations", action="store_true",
                   help="do not train answers to end with their gold passages' markers ([2])")
    p.add_argument("--kind", choices=ANSWER_KINDS, help="answer kind of questions that name none (default: span, "
                                                         "or choice when --choices is given)")
    p.add_argument("--choices", type=parse_choices, metavar="A,B,...",
                   help="default answer choices of questions that name none, comma-separated (e.g. yes,no,maybe)")
    p.add_argument("--abstain-at", help="answer_rate=R: hold out questions, fit the calibrated abstention head on "
                                        "them and abstain below the score that answers R of answerable questions")
    p.add_argument("--held-out", type=float, help="share of questions held out for --abstain-at (default 0.15)")
    p.add_argument("--encoder", help="fail unless the index was built with this encoder")
    p.add_argument("--train-retriever", choices=RETRIEVER_SUPERVISIONS,
                   help="joint training: also train the index's encoder in the same steps (contrastive: question "
                        "-> gold chunk; lsr: follow the adapter's preference among the top-k chunks); saved in "
                        "OUT/retriever, and the index is re-embedded with it at the end")
    p.add_argument("--retriever-weight", type=float, help="joint training: weight of the retriever's loss "
                                                           "(default 1.0)")
    p.add_argument("--retriever-lr", type=float, help="joint training: the encoder's learning rate (default 2e-5)")
    p.add_argument("--lr", type=float, help="learning rate (default: 5e-4 for lora/adalora, 3e-3 for ia3, 1e-2 for "
                                             "--soft-tokens)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seed", type=int)
    # unlike TrainConfig (whose default is only the final adapter), a command-line run keeps checkpoints
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: none)")
    p.add_argument("--eval-every", type=int, help="steps between evaluation-loss runs on --eval-qa")
    p.add_argument("--log-every", type=int, help="steps between logged losses (default: TrainConfig.log_every)")
    p.add_argument("--eval-qa", help="held-out questions for --eval-every")
    p.add_argument("--eval-articles", help="SQuAD articles of --eval-qa, e.g. 3:5")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers: ~2x tokens/s on a GPU after a 1-2 minute compile; "
                        "worth it for runs of several hundred steps or more")
    p.add_argument("--gradient-checkpointing", nargs="?", type=checkpointing_option, const=1.0, default=0.0,
                   metavar="FRACTION|selective",
                   help="recompute each layer's activations in the backward pass: far less activation memory for "
                        "about a third more compute (with --compile too); a FRACTION below 1 recomputes only that "
                        "share of the layers, keeping the others' activations (less memory saved, less compute); "
                        "'selective' keeps the outputs of the large matrix products and attention and recomputes "
                        "only the cheap operations between them (on a GPU, use it with --compile: eagerly its "
                        "policy runs per operation in Python, and it was slower than recomputing every layer)")
    add_quantize_argument(p, "QLoRA: the adapter trains in full precision on it and loads on either base")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    # Imported here so `retro-peft --help` stays fast.
    from retro_peft.adapters import RetrievalConfig, RetroAdapterConfig, RetroPeftModel, config_for_method
    from retro_peft.index import open_index
    from retro_peft.kvcache import FrozenKVCache
    from retro_peft.kvcache.soft import SOFT_TOKENS_LR
    from retro_peft.qa import load_qa
    from retro_peft.training import TrainConfig, build_examples, latest_checkpoint, train
    from retro_peft.base_model import check_device
    from retro_peft.training import distributed
    from retro_peft.training.calibrate import DEFAULT_HELD_OUT, calibrate, split_held_out
    from retro_peft.training.joint import JointRetrieverConfig, RetrieverObjective
    from retro_peft.training.trainer import check_output_dir
    from retro_peft.adapters.model import RETRIEVER_FOLDER, read_retro_config

    out = Path(args.out)
    # Every check that can fail runs before the model is loaded or a step is taken.
    if (out / "retro_config.json").exists() and not args.resume:
        raise InputError(f"{out} already holds a trained adapter; choose another --out (or --resume a run there)")
    check_output_dir(out, resume=args.resume)
    start = read_retro_config(args.from_adapter) if args.from_adapter else None  # refuses a folder that is none
    start_config = RetroAdapterConfig.from_dict(start["adapter"]) if start is not None else None
    # a continued adapter keeps its retrieval settings except those given here
    retrieval = dataclasses.replace(start_config.retrieval if start_config else RetrievalConfig(),
                                    **given(args, "k", "distractors", "oracle_fraction", "context_tokens", "mode",
                                            "grounding"),
                                    block_attention=args.block_attention,
                                    **({"citations": False} if args.no_citations else {}))
    for flag, value in (("--distill", args.distill), ("--soft-tokens", args.soft_tokens)):
        if value is not None and not args.block_attention:
            raise InputError(f"{flag} pulls the frozen KV cache's layout toward the full prefill: add --block-attention")
    if args.soft_tokens is not None and args.soft_tokens < 1:  # 0 would train the adapter itself instead
        raise InputError(f"--soft-tokens: at least 1 soft token per passage, got {args.soft_tokens}")
    if args.soft_tokens is not None and not args.from_adapter:
        raise InputError("--soft-tokens trains on a trained adapter, frozen: give it with --from-adapter DIR")
    if args.gradient_checkpointing and args.block_attention:
        raise InputError("--gradient-checkpointing cannot train with --block-attention (that layout is built from "
                         "the passages' KV caches, which checkpointing turns off): drop one of the two")
    answer_rate = abstain_at(args)
    # The block recipe continues the full-attention adapter for as many steps as it had: on SQuAD (three seeds)
    # the cached layout then came within 0.9 F1 of the full prefill, against 2.5 with half as many.
    recorded_steps = (start.get("training", {}).get("config", {}).get("steps")
                      if args.steps is None and args.block_attention and start is not None
                      and args.soft_tokens is None else None)
    train_config = TrainConfig(**given(args, "steps", "batch_size", "grad_accum", "seed", "eval_every", "device",
                                       "quantize", "quantize_skip", "log_every", "distill", "soft_tokens"),
                               **({"steps": recorded_steps} if recorded_steps else {}),
                               checkpoint_every=args.checkpoint_every, compile=args.compile,
                               gradient_checkpointing=args.gradient_checkpointing)
    if start is not None and args.method not in (None, start["method"]):
        raise InputError(f"--method {args.method} differs from --from-adapter's method ({start['method']})")
    method = start["method"] if start is not None else args.method or PEFT_METHODS[0]
    if start is not None and method == "adalora":
        raise InputError("--from-adapter cannot continue an AdaLoRA adapter (its rank budget schedule is spent): "
                         "start from a lora or ia3 adapter")
    config = (dataclasses.replace(start_config, retrieval=retrieval) if start_config else
              config_for_method(method, retrieval=retrieval, steps=train_config.steps))
    # `is not None`: --lr 0 must reach validate's error, not fall back to the default.
    train_config.lr = args.lr if args.lr is not None else SOFT_TOKENS_LR if args.soft_tokens else config.default_lr
    train_config.validate()
    items = load_qa(args.qa, articles=parse_articles(args.articles), require_answers=True, kind=args.kind,
                    choices=args.choices)
    held_out = None
    if answer_rate:
        items, held_out = split_held_out(items, args.held_out or DEFAULT_HELD_OUT, train_config.seed)
    elif args.held_out is not None:
        raise InputError("--held-out is the calibration share of --abstain-at: give --abstain-at answer_rate=R")
    if args.train_retriever is None and (args.retriever_weight is not None or args.retriever_lr is not None):
        raise InputError("--retriever-weight and --retriever-lr belong to --train-retriever contrastive|lsr")
    joint = JointRetrieverConfig(supervision=args.train_retriever, seed=train_config.seed,
                                 **{k: v for k, v in (("weight", args.retriever_weight), ("lr", args.retriever_lr))
                                    if v is not None}) if args.train_retriever else None
    if joint is not None:
        joint.validate()
    eval_items = load_qa(args.eval_qa, articles=parse_articles(args.eval_articles)) if args.eval_qa else None
    index = open_index(args.index, encoder=args.encoder)
    data_sha = qa_digest(args.qa, args.articles)
    seed = train_config.seed
    # contrastive: its checks (every gold document in the index) run before the generator is loaded
    retriever = RetrieverObjective(index, items, joint) if joint and joint.supervision == "contrastive" else None
    # a quantized base is placed on its device when loaded (the trainer moves a full-precision one itself)
    # (under torchrun, on this rank's own GPU)
    device = str(distributed.local_device(check_device(train_config.device))) if train_config.quantize else None
    if start is None:
        model = RetroPeftModel.create(args.model or DEFAULT_GENERATOR, config, seed=seed,
                                      quantize=train_config.quantize, quantize_skip=train_config.quantize_skip,
                                      device=device)
    else:  # its weights, the new run's settings (saved with it); its answerability head fitted the old answers
        model = RetroPeftModel.load(args.from_adapter, base_model=args.model, is_trainable=True,
                                    quantize=train_config.quantize, quantize_skip=train_config.quantize_skip,
                                    device=device)
        model.config, model.answerability = config, None
        model.info["trained_from"] = str(Path(args.from_adapter).absolute())
    if joint is not None and retriever is None:
        retriever = RetrieverObjective(index, items, joint, tokenizer=model.tokenizer, retrieval=retrieval)
    examples = build_examples(items, index, model.tokenizer, retrieval, seed=seed)
    eval_examples = build_examples(eval_items, index, model.tokenizer, retrieval, seed=seed) if eval_items else None
    if args.resume and latest_checkpoint(out) is None and distributed.is_main():
        print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr)

    def fit_answerability() -> None:
        if not held_out:
            return
        generator = model.generator(index)
        if retrieval.block_attention:  # it answers through the frozen KV cache: its head reads that layout's states
            chunks = {p.chunk_id for ps in generator.retrieve([it.question for it in held_out]) for p in ps}
            cache = FrozenKVCache.build(model.model, model.tokenizer, index, retrieval, chunk_ids=chunks,
                                        soft=model.soft_tokens)
            generator = model.generator(index, kv_cache=cache)
        model.answerability = calibrate(generator, held_out, answer_rate=answer_rate, seed=seed)

    result = train(model, examples, train_config, out_dir=out, eval_examples=eval_examples, resume=args.resume,
                   index=index, data_sha256=data_sha, progress=show_progress(args), before_save=fit_answerability,
                   retriever=retriever)
    trainable, total = model.trainable_parameters()
    summary = {"out": str(out), "method": method, "steps": result.steps, "final_loss": result.final_loss,
               "tokens_per_s": round(result.tokens_per_s, 1), "seconds": round(result.seconds, 1),
               "trainable_params": trainable, "total_params": total, "examples": len(examples),
               "resumed_from": result.resumed_from, "eval_losses": result.eval_losses}
    if retriever is not None:
        summary["retriever"] = {"supervision": joint.supervision, "weight": joint.weight,
                                "losses": result.retriever_losses[-3:], "reembedded": result.reembedded,
                                "encoder": str(out / RETRIEVER_FOLDER)}
    if result.final_ranks is not None:
        summary["final_ranks"] = result.final_ranks
    if model.soft_tokens is not None:
        summary["soft_tokens"] = model.soft_tokens.count
    if model.answerability is not None:
        summary["answerability"] = {"answer_rate": model.answerability.answer_rate,
                                    "threshold": model.answerability.threshold, **model.answerability.stats}
    if distributed.is_main():  # one summary, not one per rank
        print(json.dumps(summary, indent=2))
    return 0
