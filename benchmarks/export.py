"""Merged export: does the merged model (`retro-peft export --merge`) answer exactly as base + adapter?

A RetroLoRA is trained on real SmolLM2 (SQuAD articles 0-2, `--steps` steps; or `--adapter DIR` is used as is),
merged into the base with `adapters.export.export_merged`, and both answer the first `--limit` questions of the
unseen articles 3-4 greedily, float32, on the CPU, with the same retrieval and prompts. Reported: how many answers
are identical, and the ones that differ.

    .venv/bin/python benchmarks/export.py --out benchmarks/results/export-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import SCRATCH, SQUAD, machine_info, print_json
from quality import EVAL_ARTICLES, TRAIN_ARTICLES, open_or_build_index


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", help="an adapter folder to export (default: train one)")
    p.add_argument("--squad", default=str(SQUAD))
    p.add_argument("--index", default=str(SCRATCH / "index-squad5"), help="index folder (built if missing)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--work", type=Path, default=SCRATCH / "export", help="where the adapter and export are written")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
    from retro_peft.adapters.export import ExportConfig, export_merged
    from retro_peft.generation import Generator
    from retro_peft.qa import load_qa
    from retro_peft.training import TrainConfig, build_examples, train

    args = parse_args(argv)
    torch.manual_seed(0)
    index = open_or_build_index(args)
    start = time.perf_counter()
    adapter = Path(args.adapter) if args.adapter else args.work / "adapter"
    if not args.adapter:
        retrieval = RetrievalConfig(k=3, distractors=1, oracle_fraction=0.8, context_tokens=700)
        config = config_for_method("lora", retrieval=retrieval, steps=args.steps)
        model = RetroPeftModel.create(args.model, config, seed=0)
        examples = build_examples(load_qa(args.squad, articles=TRAIN_ARTICLES), index, model.tokenizer, retrieval,
                                  seed=0)
        train(model, examples, TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=config.default_lr,
                                           device="cpu"), index=index, progress=False)
        model.save(adapter, index=index)
        del model
    trained = time.perf_counter()
    merged_dir = Path(export_merged(adapter, ExportConfig(out=args.work / "merged", overwrite=True))["out"])
    exported = time.perf_counter()

    questions = [item.question for item in load_qa(args.squad, articles=EVAL_ARTICLES)[: args.limit]]
    with_adapter = RetroPeftModel.load(adapter, base_model=args.model, dtype=torch.float32, device="cpu")
    theirs = with_adapter.generator(index, max_new_tokens=args.max_new_tokens).answer_many(questions)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    mine = Generator(merged, with_adapter.tokenizer, index=index, retrieval=with_adapter.retrieval,
                     max_new_tokens=args.max_new_tokens).answer_many(questions)
    differ = [{"question": q, "base_plus_adapter": a.text, "merged": b.text}
              for q, a, b in zip(questions, theirs, mine) if a.text != b.text]
    print_json({"machine": machine_info(), "model": args.model, "adapter": str(adapter),
                "trained_steps": None if args.adapter else args.steps, "questions": len(questions),
                "identical": len(questions) - len(differ), "differ": differ,
                "answered": sum(bool(a.text.strip()) for a in theirs),
                "seconds": {"train": round(trained - start, 1), "export": round(exported - trained, 1),
                            "answer_both": round(time.perf_counter() - exported, 1)}}, args.out)
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
