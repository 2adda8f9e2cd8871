"""Answer quality, side by side, on the SQuAD 2.0 standard split.

Corpus: all 173 paragraphs of the 5 articles (one MiniLM + BM25 index). Train on
the questions of articles 0-2, evaluate on articles 3-4 (unseen articles).

  (a) base model, closed book          (b) base model + retrieval
  (c) LoRA trained without retrieval   (d) RetroLoRA   (e) RetroAdaLoRA   (f) RetroIA3
  (g) RetroLoRA trained with block attention (the frozen KV cache's layout)
  (h) (d) continued with block attention on full and block copies of each example, distilled toward
      its full prefill (TrainConfig.distill; the Block-Attention recipe with KVLink-style distillation)
  (i) (d) frozen, with --soft-tokens N trained after each stored passage (TrainConfig.soft_tokens, KV Packet),
      by distillation toward (d)'s full prefill; answered through the frozen KV cache only (its full
      prefill is (d)'s); (j) the same on (h)'s adapter

(d), (g) and (h) are also evaluated through the frozen KV cache (`+ kv cache` rows): each
passage's states computed apart and stored, only the question prefilled; with --kv-blend M,...
also in the blend layout with M tokens of each later passage recomputed (`_kv_blend_M` rows), and with
--kv-deviation R,... in the deviation layout (`--cached-rows` picks which variants get these rows).
With --abstain-at R, 15% of the training questions are held out (by document) and every row answers with
an answerability head calibrated on them in that row's own layout (full prefill, or the cache's); with
--cross-head the cached rows also answer with the head fitted in the full layout (`_full_head` rows).

For every trained variant: trainable parameters, training time, tokens/s. The
trainer's speed against a plain `transformers.Trainer` is `benchmarks/throughput.py`.

    python benchmarks/quality.py --steps 2 --limit 4                    # smoke run (CPU)
    python benchmarks/quality.py --device cuda --steps 300              # the real run
    python benchmarks/quality.py --variants d --quantize 4bit --out .bench/quality-4bit   # QLoRA: the 4-bit base
    python benchmarks/quality.py --variants d --quantize 4bit --quantize-skip down_proj,k_proj,v_proj \
        --model .bench/smollm2-gptq-dkv    # QLoRA on a base rounded by `retro-peft gptq` (its --quantize-skip);
                                           # the full-precision row then serves on the base it was rounded from
    python benchmarks/quality.py --device cuda --variants d,h --oracle-fraction 1.0 --distill 1 --abstain-at 0.9
    python benchmarks/quality.py --device cuda --variants d,i --oracle-fraction 1.0 --soft-tokens 8 --cached-rows d

Writes <out>/quality.json and <out>/quality.md (default out: .bench/quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

import plots
from common import SCRATCH, SQUAD, write_json
from retro_peft.choices import QUANTIZE_MODES
from retro_peft.cli import parse_quantize_skip

TRAIN_ARTICLES, EVAL_ARTICLES = slice(0, 3), slice(3, 5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="base model name, folder or HF id")
    p.add_argument("--squad", default=str(SQUAD))
    p.add_argument("--index", default=str(SCRATCH / "index-squad5"), help="index folder (built if missing)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, help="default: 8 on cuda, 4 on cpu")
    p.add_argument("--lr", type=float, help="learning rate (default: each method's default_lr)")
    p.add_argument("--k", type=int, default=3, help="retrieved passages per prompt")
    p.add_argument("--distractors", type=int, default=1)
    p.add_argument("--oracle-fraction", type=float, default=0.8, help="RAFT's P")
    p.add_argument("--context-tokens", type=int, default=700)
    p.add_argument("--limit", type=int, help="evaluate the first N questions of articles 3-4 (default: all 457)")
    p.add_argument("--train-limit", type=int, help="train on the first N questions of articles 0-2")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="a,b,c,d,e,f",
                   help="comma-separated subset of a-j (h and i train d first, j trains h)")
    p.add_argument("--kv-blend", help="comma-separated recompute_tokens values for the blend layout rows of (d), (g), (h)")
    p.add_argument("--kv-deviation", help="comma-separated recompute_ratio values for the deviation layout rows of "
                                           "(d), (g), (h) (CacheBlend's selection)")
    p.add_argument("--cached-rows", default="d,g,h",
                   help="which of (d), (g), (h) also answer through the frozen KV cache (its block, blend, deviation rows)")
    p.add_argument("--abstain-at", type=float, metavar="R",
                   help="hold out 15%% of the training questions and answer every row with an answerability head "
                        "fitted on them in that row's own layout, at answer rate R (train --abstain-at)")
    p.add_argument("--cross-head", action="store_true",
                   help="with --abstain-at: cached rows also answer with the head fitted in the full layout "
                        "(`_full_head` rows): what refitting it in the cache's layout (`retro-peft calibrate`) gains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-steps", type=int, help="(h): steps of the continued block training (default: --steps, as many as (d)'s; "
                   "measured: its cached F1 0.9 below (d)'s full prefill, 2.5 with half as many)")
    p.add_argument("--distill", type=float, default=1.0, help="(h): weight of the KL toward the full prefill")
    p.add_argument("--soft-tokens", type=int, default=8, help="(i), (j): soft tokens after each stored passage")
    p.add_argument("--soft-steps", type=int, help="(i), (j): steps of soft-token training (default: --block-steps, else --steps / 2)")
    p.add_argument("--soft-lr", type=float, help="(i), (j): their learning rate (default: SOFT_TOKENS_LR)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="every variant on a base quantized by bitsandbytes (QLoRA for the trained ones); compare "
                        "with a run without it, same steps")
    p.add_argument("--quantize-skip", type=parse_quantize_skip, default=(),
                   help="with --quantize: linear layers kept unquantized (comma-separated, e.g. down_proj,v_proj)")
    p.add_argument("--out", default=str(SCRATCH / "quality"))
    return p.parse_args(argv)


def load_base(args):
    """(model, tokenizer, name): fresh base weights, trainable in fp32 (bf16 comes from autocast on CUDA); with
    --quantize, the linear layers quantized (the adapter still trains in fp32)."""
    from retro_peft.base_model import load_base_model

    model, tokenizer, _ = load_base_model(args.model, dtype=torch.float32, device=args.device, quantize=args.quantize,
                                          quantize_skip=args.quantize_skip)
    return model, tokenizer, args.model


def open_or_build_index(args):
    from retro_peft.index import IndexConfig, build_index, open_index

    path = Path(args.index)
    if (path / "manifest.json").exists():
        return open_index(path)
    print(f"building the index of all SQuAD paragraphs at {path} ...", file=sys.stderr)
    return build_index(path, [args.squad], IndexConfig(encoder="minilm"))


def train_variant(args, method, retrieval, train_items, index, base_factory):
    """Train one adapter; returns (RetroPeftModel, stats, examples)."""
    from retro_peft.adapters import RetroPeftModel, config_for_method
    from retro_peft.training import TrainConfig, build_examples, train

    base, tokenizer, name = base_factory()
    config = config_for_method(method, retrieval=retrieval, steps=args.steps)
    model = RetroPeftModel.create(base, config, tokenizer=tokenizer, seed=args.seed)
    model.base_model_name = name
    examples = build_examples(train_items, index, tokenizer, retrieval, seed=args.seed)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or config.default_lr,
                               seed=args.seed, device=args.device, log_every=10, quantize=args.quantize,
                               quantize_skip=args.quantize_skip)
    result = train(model, examples, train_config)
    trainable, total = model.trainable_parameters()
    stats = {"trainable_params": trainable, "total_params": total, "train_seconds": round(result.seconds, 2),
             "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
             "examples": len(examples), "with_gold": sum(ex.has_gold for ex in examples)}
    if result.final_ranks:
        stats["final_ranks"] = result.final_ranks
        stats["final_rank_total"] = sum(result.final_ranks.values())
    return model, stats, examples


def continue_in_block_layout(args, model, block, train_items, index) -> dict:
    """(h): `model` trained on, in place, on block examples with their full copies and the distillation loss."""
    from retro_peft.training import TrainConfig, build_examples, train

    examples = build_examples(train_items, index, model.tokenizer, block, seed=args.seed)
    model.config = dataclasses.replace(model.config, retrieval=block)
    steps = args.block_steps or args.steps
    result = train(model, examples, TrainConfig(steps=steps, batch_size=args.batch_size,
                                                lr=args.lr or model.config.default_lr, seed=args.seed,
                                                device=args.device, log_every=10, quantize=args.quantize,
                                                quantize_skip=args.quantize_skip,
                                                distill=args.distill))
    return {"continued_steps": steps, "distill": args.distill, "train_seconds": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens_per_s, 1), "first_loss": result.losses[0][1] if result.losses else None,
            "final_loss": result.final_loss,
            "examples": len(examples)}


def train_soft_tokens(args, model, block, train_items, index) -> dict:
    """(i), (j): soft tokens trained on `model`'s adapter, frozen, by distillation toward its full prefill."""
    from retro_peft.kvcache.soft import SOFT_TOKENS_LR
    from retro_peft.training import TrainConfig, build_examples, train

    examples = build_examples(train_items, index, model.tokenizer, block, seed=args.seed)
    model.config, model.soft_tokens = dataclasses.replace(model.config, retrieval=block), None
    steps = args.soft_steps or args.block_steps or max(1, args.steps // 2)
    result = train(model, examples, TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.soft_lr or SOFT_TOKENS_LR,
                                                seed=args.seed, device=args.device, log_every=10,
                                                quantize=args.quantize, quantize_skip=args.quantize_skip,
                                                soft_tokens=args.soft_tokens))
    return {"soft_tokens": args.soft_tokens, "soft_steps": steps, "train_seconds": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "first_loss": result.losses[0][1] if result.losses else None,  # the KL after the first log_every steps
            "final_loss": result.final_loss,
            "trainable_params": result.trainable_params, "examples": len(examples)}


def soft_token_row(args, report, label, model, cfg, train_items, index, eval_items) -> None:
    block = dataclasses.replace(cfg, block_attention=True)
    stats = train_soft_tokens(args, model, block, train_items, index)
    stats.update(evaluate_variant(model.model, model.tokenizer, index, block, eval_items, closed_book=False,
                                  kv_cache=True, calibration=args.calibration, soft=model.soft_tokens))
    record(args, report, label, stats)
    model.soft_tokens = None  # the adapter goes on without them


def evaluate_cached(args, report, label, model, index, cfg, eval_items) -> None:
    """`label`'s adapter answering through the frozen KV cache: block layout, then each blend and deviation."""
    def row(**layout):
        return evaluate_variant(model.model, model.tokenizer, index, cfg, eval_items, closed_book=False,
                                kv_cache=True, calibration=args.calibration, **layout)

    record(args, report, label + "_kv_cache", row())
    if args.cross_head and args.calibration is not None:  # the head fitted in the full layout, used through the cache
        from retro_peft.generation import Generator
        from retro_peft.training.calibrate import calibrate

        full = Generator(model.model, model.tokenizer, index=index, retrieval=cfg, max_new_tokens=24, batch_size=16)
        head = calibrate(full, args.calibration[0], answer_rate=args.calibration[1], seed=0)
        record(args, report, label + "_kv_cache_full_head", row(head=head))
    for m in [int(x) for x in args.kv_blend.split(",")] if args.kv_blend else []:
        record(args, report, f"{label}_kv_blend_{m}", row(blend=m))
    for r in [float(x) for x in args.kv_deviation.split(",")] if args.kv_deviation else []:
        record(args, report, f"{label}_kv_deviation_{r}", row(deviation=r))


def unrounded_base(name: str) -> str:
    """The base a `retro-peft gptq` folder was rounded from (as its record names it), else `name` itself: the
    full-precision row serves the adapter on the original weights, not on their 4-bit rounding."""
    from retro_peft.base_model import ROUNDING_RECORD

    record = Path(name) / ROUNDING_RECORD
    return json.loads(record.read_text())["base_model"] if record.is_file() else name


def on_full_precision_base(args, model, index, cfg, eval_items) -> dict:
    """A QLoRA adapter saved and loaded onto the unquantized base (a saved adapter loads on either), then
    evaluated there, its head refitted on that base's states: QLoRA's cheap training, served at full precision."""
    import tempfile

    from retro_peft.adapters import RetroPeftModel

    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        model.save(Path(folder) / "adapter")
        full = RetroPeftModel.load(Path(folder) / "adapter", base_model=unrounded_base(args.model),
                                   dtype=torch.float32, device=args.device)
    scores = evaluate_variant(full.model, full.tokenizer, index, cfg, eval_items, closed_book=False,
                              calibration=args.calibration)
    del full
    return scores


def record(args, report, label, row) -> None:
    report["variants"][label] = row
    write_json(Path(args.out) / "quality.json", report)  # after each row: a run cut short keeps what it measured


def evaluate_variant(model, tokenizer, index, retrieval, eval_items, *, closed_book, kv_cache=False, blend=None,
                     deviation=None, calibration=None, soft=None, head=None):
    """calibration: (held-out questions, answer rate): an answerability head fitted in this row's own layout;
    head: this head instead (fitted elsewhere); soft: the soft tokens stored after each passage of the cache."""
    from retro_peft.generation import Generator
    from retro_peft.kvcache import FrozenKVCache
    from retro_peft.training import evaluate

    start = time.perf_counter()
    cache = FrozenKVCache.build(model, tokenizer, index, retrieval, soft=soft) if kv_cache else None
    if blend is not None:  # the same stored states, later passages' first `blend` tokens recomputed
        cache = cache.with_layout("blend", blend)
    if deviation is not None:  # the same stored states, the `deviation` share of later passages' tokens recomputed
        cache = cache.with_layout("deviation", recompute_ratio=deviation)
    generator = Generator(model, tokenizer, index=None if closed_book else index, retrieval=retrieval,
                          max_new_tokens=24, batch_size=16, kv_cache=cache)
    if head is not None:
        generator.answerability = head
    elif calibration is not None:
        from retro_peft.training.calibrate import calibrate

        generator.answerability = calibrate(generator, calibration[0], answer_rate=calibration[1], seed=0)
    result = evaluate(generator, eval_items, retrieval=not closed_book)
    scores = result.summary()
    scores["eval_seconds"] = round(time.perf_counter() - start, 2)
    if generator.answerability is not None:  # the layout its head was calibrated in: this row's own
        scores["head_layout"] = generator.answerability.layout
    return scores


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.device == "cuda" else 4)
    torch.manual_seed(args.seed)
    from retro_peft.adapters import RetrievalConfig
    from retro_peft.qa import load_qa

    variants = set(args.variants.split(","))
    cached_rows = set(args.cached_rows.split(","))
    # bad arguments fail here, not after the first variant's training
    if not cached_rows <= {"d", "g", "h"}:
        raise SystemExit(f"--cached-rows: only d, g and h answer through the cache, got {args.cached_rows!r}")
    if args.abstain_at is not None and not 0 < args.abstain_at <= 1:
        raise SystemExit(f"--abstain-at: an answer rate in (0, 1], got {args.abstain_at}")
    if not args.distill >= 0:
        raise SystemExit(f"--distill: a weight >= 0, got {args.distill}")
    index = open_or_build_index(args)
    train_items = load_qa(args.squad, articles=TRAIN_ARTICLES)[: args.train_limit]
    args.calibration = None
    if args.abstain_at is not None:  # every variant trains on the rest; each row's head is fitted in its layout
        from retro_peft.training.calibrate import split_held_out

        train_items, held_out = split_held_out(train_items, seed=args.seed)
        args.calibration = (held_out, args.abstain_at)
    eval_items = load_qa(args.squad, articles=EVAL_ARTICLES)[: args.limit]
    retrieval = RetrievalConfig(k=args.k, distractors=args.distractors, oracle_fraction=args.oracle_fraction,
                                context_tokens=args.context_tokens)
    closed = dataclasses.replace(retrieval, k=0, distractors=0)
    base_factory = lambda: load_base(args)  # noqa: E731  (each variant starts from fresh base weights)
    report = {"model": args.model, "device": args.device, "quantize": args.quantize,
              "quantize_skip": list(args.quantize_skip),
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr or "per-method default",
              "retrieval": dataclasses.asdict(retrieval), "n_train": len(train_items),
              "n_eval": len(eval_items), "index_chunks": len(index), "torch": torch.__version__,
              "abstain_at": args.abstain_at, "n_held_out": len(args.calibration[0]) if args.calibration else 0,
              "variants": {}}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if variants & {"a", "b"}:
        base, tokenizer, _ = base_factory()
        if "a" in variants:
            record(args, report, "a_base_closed_book", evaluate_variant(base, tokenizer, index, closed, eval_items,
                                                                        calibration=args.calibration, closed_book=True))
        if "b" in variants:
            record(args, report, "b_base_retrieval", evaluate_variant(base, tokenizer, index, retrieval, eval_items,
                                                                      calibration=args.calibration, closed_book=False))
        del base
    plan = [("c", "c_lora_closed_book", "lora", closed), ("d", "d_retro_lora", "lora", retrieval),
            ("e", "e_retro_adalora", "adalora", retrieval), ("f", "f_retro_ia3", "ia3", retrieval),
            ("g", "g_retro_lora_block", "lora", dataclasses.replace(retrieval, block_attention=True))]
    for key, label, method, cfg in plan:
        if key not in variants and not (key == "d" and variants & {"h", "i", "j"}):
            continue
        model, stats, _ = train_variant(args, method, cfg, train_items, index, base_factory)
        if key in variants:  # (trained only as the start of h, i or j: its rows are not asked for)
            stats.update(evaluate_variant(model.model, model.tokenizer, index, cfg, eval_items,
                                          closed_book=cfg.k == 0, calibration=args.calibration))
            record(args, report, label, stats)
            if key in cached_rows:  # the same adapter answering through the frozen KV cache
                evaluate_cached(args, report, label, model, index, cfg, eval_items)
            if args.quantize and key == "d":  # trained on the quantized base, served on the full-precision one
                record(args, report, label + "_on_full_precision_base",
                       on_full_precision_base(args, model, index, cfg, eval_items))
        if key == "d" and "i" in variants:  # the adapter frozen, soft tokens trained for the cache's layout
            soft_token_row(args, report, "i_retro_lora_soft_tokens_kv_cache", model, cfg, train_items, index,
                           eval_items)
        if key == "d" and variants & {"h", "j"}:  # then the same adapter, trained on in the cache's layout
            block = dataclasses.replace(cfg, block_attention=True)
            label = "h_retro_lora_block_distilled"
            stats = continue_in_block_layout(args, model, block, train_items, index)
            if "h" in variants:
                stats.update(evaluate_variant(model.model, model.tokenizer, index, block, eval_items,
                                              closed_book=False, calibration=args.calibration))
            record(args, report, label, stats)  # (with j alone: its training only)
            if "h" in variants and "h" in cached_rows:
                evaluate_cached(args, report, label, model, index, block, eval_items)
            if "j" in variants:
                soft_token_row(args, report, "j_retro_lora_block_distilled_soft_tokens_kv_cache", model, block,
                               train_items, index, eval_items)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()

    write_json(out / "quality.json", report)
    plots.chart_beside(out / "quality.json", report, plots.quality)
    (out / "quality.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    def fmt(v, pct=False):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{100 * v:.1f}" if pct else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    skip = f", {', '.join(report['quantize_skip'])} kept" if report.get("quantize_skip") else ""
    base = f" ({report['quantize']} base{skip})" if report.get("quantize") else ""
    lines = [f"model {report['model']}{base} on {report['device']}, {report['steps']} steps x batch {report['batch_size']}, "
             f"train {report['n_train']} questions (articles 0-2), eval {report['n_eval']} (articles 3-4)", "",
             "| variant | EM | F1 | abstain unanswerable % | answer answerable % | retrieval recall % "
             "| trainable params | train s | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in report["variants"].items():
        lines.append(f"| {name} | {fmt(v.get('em'), True)} | {fmt(v.get('f1'), True)} | "
                     f"{fmt(v.get('abstain_unanswerable'), True)} | {fmt(v.get('answer_answerable'), True)} | "
                     f"{fmt(v.get('retrieval_recall'), True)} | {fmt(v.get('trainable_params'))} | "
                     f"{fmt(v.get('train_seconds'))} | {fmt(v.get('tokens_per_s'))} |")
    ranks = report["variants"].get("e_retro_adalora", {}).get("final_rank_total")
    if ranks is not None:
        lines.append(f"AdaLoRA final total rank: {ranks}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
