"""`retro-peft demo`: index retro-peft's own documentation, train RetroLoRA on it, compare, register `retro-docs`."""

from __future__ import annotations

from retro_peft.cli import add_progress_argument, show_progress


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on retro-peft's own docs (~5-8 minutes on a CPU)",
                       description="Index the documentation shipped with retro-peft, train a RetroLoRA adapter on "
                                   "QA pairs about it, compare base closed-book / base + retrieval / RetroLoRA + "
                                   "retrieval on held-out questions, and register the domain `retro-docs`.")
    p.add_argument("--steps", type=int, help="training steps (default 40; 2 with --quick)")
    p.add_argument("--out", help="adapter folder (default $RETRO_PEFT_HOME/adapters/retro-docs)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 4 questions, 8-token answers")
    p.add_argument("--limit", type=int, help="evaluate the first N held-out questions (default all)")
    p.add_argument("--report", help="also write the scores, predictions and timings to this JSON file")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core; 1 is faster on a busy machine)")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from retro_peft.demo import DemoConfig, run_demo

    overrides = {k: v for k, v in (("steps", args.steps), ("eval_limit", args.limit), ("threads", args.threads)) if v is not None}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(config, out_dir=args.out, progress=show_progress(args), report=args.report)
    return 0
