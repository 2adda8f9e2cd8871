"""Trainer throughput: retro-peft's training loop against a plain `transformers.Trainer` + peft.

Same examples, model, LoRA config, batch size, steps and learning rate; tokens are
the real (non-padding) tokens trained on, tokens/s is over the whole `train()` call.
Each variant first runs `--warmup-steps` untimed steps on a fresh model (CUDA
context, kernels, compilation: reported as `cold_seconds`), then `--repeats`
timed runs of `--steps` steps, each on a fresh model; the median is reported.

  hf        transformers.Trainer (bf16=True on CUDA), the usual right-padding collator
  ours      retro_peft.training.train: length-grouped batches, LM head on answer positions only
  compiled  the same with TrainConfig(compile=True): each decoder layer torch.compiled (CUDA)

    .venv/bin/python benchmarks/throughput.py --device cpu --out benchmarks/results/throughput-cpu.json
    # GPU machines have no index or weights: save the examples here, carry them and the tokenizer
    .venv/bin/python benchmarks/throughput.py --save-examples .device/examples.json
    python benchmarks/throughput.py --examples examples.json --tokenizer tok/ --model random:llama-1b --device cuda

--ddp: data-parallel, one process per GPU under torchrun (variants ours/compiled); tokens/s are all GPUs'
together at the same per-GPU batch, so the scaling ratio is this run's over a 1-GPU run's:
    torchrun --nproc_per_node 2 benchmarks/throughput.py --ddp --examples examples.json --tokenizer tok/ \
        --model random:llama-8b --device cuda --variants ours --out throughput-ddp2.json

The examples are RetroLoRA's (k=3, 1 distractor, P=0.8) for the questions of SQuAD
articles 0-2, built from the index of all 173 paragraphs with SmolLM2's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from retro_peft.training.data import TrainingExample

import plots
from common import RANDOM_CONFIGS, SCRATCH, SQUAD, machine_info, machine_summary, print_json


def build_examples(index_path: Path) -> list[TrainingExample]:
    from transformers import AutoTokenizer

    from retro_peft.adapters import RetrievalConfig
    from retro_peft.index import IndexConfig, build_index, open_index
    from retro_peft.models import resolve_generator
    from retro_peft.qa import load_qa
    from retro_peft.training import build_examples as build

    index = open_index(index_path) if (index_path / "manifest.json").exists() else \
        build_index(index_path, [SQUAD], IndexConfig(encoder="minilm"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_generator("smollm2-135m"))
    items = load_qa(SQUAD, articles=slice(0, 3))
    return build(items, index, tokenizer, RetrievalConfig(k=3, distractors=1, oracle_fraction=0.8), seed=0)


def load_examples(path: Path) -> list[TrainingExample]:
    rows = json.loads(path.read_text())
    return [TrainingExample(item_id=str(i), input_ids=r["input_ids"], labels=r["labels"], target="",
                            has_gold=False, chunk_ids=[]) for i, r in enumerate(rows)]


def base_model(name: str, tokenizer, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from retro_peft.base_model import load_base_model

    torch.manual_seed(0)
    if not name.startswith("random:"):
        model, _, _ = load_base_model(name, dtype=torch.float32, device=device)
        return model
    config = LlamaConfig(**RANDOM_CONFIGS[name.split(":", 1)[1]], pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.device(device):
        return LlamaForCausalLM(config)  # fp32 weights, as a user loads them; bf16 comes from autocast


def run_ours(args, examples, tokenizer, steps: int, compile_layers: bool) -> dict:
    from retro_peft.adapters import RetroPeftModel, config_for_method
    from retro_peft.training import TrainConfig, train

    config = config_for_method("lora")
    model = RetroPeftModel.create(base_model(args.model, tokenizer, args.device), config, tokenizer=tokenizer)
    result = train(model, examples, TrainConfig(steps=steps, batch_size=args.batch_size, lr=config.default_lr,
                                                device=args.device, compile=compile_layers), progress=False)
    del model
    return {"seconds": result.seconds, "tokens": result.tokens}


def run_hf(args, examples, tokenizer, steps: int) -> dict:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from retro_peft.adapters import config_for_method

    model = get_peft_model(base_model(args.model, tokenizer, args.device), config_for_method("lora").peft)
    pad = tokenizer.pad_token_id

    def collate(rows):  # the usual right-padding collator
        width = max(len(r["input_ids"]) for r in rows)
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                            for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
        }

    class CountingTrainer(Trainer):
        """Counts the real tokens of the batches trained on (the dataloader may fetch ahead)."""

        tokens = None

        def compute_loss(self, model, inputs, *a, **kw):
            n = inputs["attention_mask"].sum()  # stays on the device: no extra sync per step
            self.tokens = n if self.tokens is None else self.tokens + n
            return super().compute_loss(model, inputs, *a, **kw)

    training_args = TrainingArguments(
        output_dir=str(SCRATCH / "hf-trainer"), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=config_for_method("lora").default_lr, warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to=[], seed=0,
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", remove_unused_columns=False,
        dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True)
    data = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]
    trainer = CountingTrainer(model=model, args=training_args, train_dataset=data, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = int(trainer.tokens)
    del trainer, model
    return {"seconds": seconds, "tokens": tokens}


def run(variant: str, args, examples, tokenizer, steps: int) -> dict:
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = run_hf(args, examples, tokenizer, steps) if variant == "hf" else \
        run_ours(args, examples, tokenizer, steps, compile_layers=variant == "compiled")
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    if args.device == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged/HF model, or random:smollm2-135m / random:llama-1b")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=None, help="comma-separated: hf, ours, compiled (default: all; no compiled on CPU)")
    p.add_argument("--steps", type=int, help="timed steps per run (default: 100 on cuda, 8 on cpu)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default: 10 on cuda, 1 on cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--batch-size", type=int, help="default: 8 on cuda, 4 on cpu")
    p.add_argument("--examples", type=Path, help="examples saved by --save-examples (else built from the index)")
    p.add_argument("--save-examples", type=Path, help="build the examples, write them here, and stop")
    p.add_argument("--index", type=Path, default=SCRATCH / "index-squad5")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the packaged SmolLM2's)")
    p.add_argument("--out", type=Path)
    p.add_argument("--ddp", action="store_true", help="data-parallel under torchrun (one process per GPU)")
    args = p.parse_args(argv)
    from retro_peft.training import distributed

    if args.ddp:
        if distributed.world_size() == 1:
            p.error("--ddp runs under a launcher: torchrun --nproc_per_node N benchmarks/throughput.py --ddp ...")
        # one process group for every run (train() joins it rather than creating one per run), on this rank's GPU
        distributed.init(distributed.local_device(torch.device(args.device)))
    cuda = args.device == "cuda"
    args.steps = args.steps or (100 if cuda else 8)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (10 if cuda else 1)
    args.repeats = args.repeats or (3 if cuda else 1)
    args.batch_size = args.batch_size or (8 if cuda else 4)
    variants = (args.variants or ("hf,ours,compiled" if cuda else "hf,ours")).split(",")
    if args.ddp and "hf" in variants:  # transformers.Trainer would set up its own DDP from the same variables
        p.error("--ddp measures retro-peft's trainer: --variants ours[,compiled]")

    if args.save_examples:
        rows = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in build_examples(args.index)]
        args.save_examples.write_text(json.dumps(rows))
        print(f"{len(rows)} examples -> {args.save_examples}")
        return 0
    from transformers import AutoTokenizer

    from retro_peft.models import resolve_generator

    examples = load_examples(args.examples) if args.examples else build_examples(args.index)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_generator("smollm2-135m"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(ex) for ex in examples]
    machine = machine_info()
    report = {"model": args.model, "device": args.device, "batch_size": args.batch_size, "steps": args.steps,
              "warmup_steps": args.warmup_steps, "repeats": args.repeats, "examples": len(examples),
              "mean_tokens_per_example": round(statistics.mean(lengths), 1), "torch": machine["torch"],
              "threads": machine["torch_threads"], "machine": machine_summary(machine),
              "gpu": machine["gpu"] if cuda else None, "world_size": distributed.world_size(), "variants": {}}
    for variant in variants:
        cold = run(variant, args, examples, tokenizer, args.warmup_steps) if args.warmup_steps else None
        runs = [run(variant, args, examples, tokenizer, args.steps) for _ in range(args.repeats)]
        report["variants"][variant] = {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "runs": [{k: round(v, 2) for k, v in r.items()} for r in runs],
            "cold_seconds": round(cold["seconds"], 2) if cold else None}
        if distributed.is_main():
            print(variant, report["variants"][variant], file=sys.stderr, flush=True)
    hf = report["variants"].get("hf", {}).get("tokens_per_s")
    if hf:
        report["speedup_vs_hf"] = {v: round(r["tokens_per_s"] / hf, 3) for v, r in report["variants"].items()}
    if not distributed.is_main():
        return 0
    print_json(report, args.out)
    if args.out:
        plots.chart_beside(args.out, report, plots.training)
    return 0


if __name__ == "__main__":
    sys.exit(main())
