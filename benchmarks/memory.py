"""Training memory: peak memory and tokens/s of retro-peft's `train()` with and without gradient checkpointing.

    .venv/bin/python benchmarks/memory.py --out benchmarks/results/memory-cpu-smollm2.json      # CPU, real SmolLM2
    python benchmarks/memory.py --model random:llama-8b --device cuda --out memory-gpu-8b.json  # GPU shape

Each configuration runs in its own process (peak memory is per process): LoRA r 16 on all 7 projections of the
model, batches of `--batch-size` examples of `--tokens` random tokens with the answer loss on the last 16,
`--steps` optimizer steps after one warm-up step. Peak memory: the process's maximum resident set on the CPU
(`ru_maxrss`, the model's weights included), `torch.cuda.max_memory_allocated` on a GPU. tokens/s: the timed
steps' tokens over their wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import machine_info, print_json

CONFIGS = {"plain": {}, "checkpointing": {"gradient_checkpointing": True}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged/HF model, or random:NAME (generation.py's shapes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokens", type=int, default=700)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration in this process (the child)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def run_one(args) -> dict:
    import resource

    import torch

    from retro_peft.adapters import RetroPeftModel, config_for_method
    from retro_peft.training import TrainConfig, train
    from retro_peft.training.data import IGNORE, TrainingExample

    base = tokenizer = None
    if args.model.startswith("random:"):  # the random-weight shapes of the generation benchmark
        from generation import load_model
        from transformers import AutoTokenizer

        from retro_peft.models import resolve_generator

        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        base = load_model(args.model, args.device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolve_generator("smollm2-135m"))  # only its padding id is used
    model = RetroPeftModel.create(base if base is not None else args.model, config_for_method("lora", steps=args.steps + 1),
                                  tokenizer=tokenizer, seed=0)
    vocab = model.model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(args.batch_size * (args.steps + 1)):
        ids = torch.randint(100, vocab - 1, (args.tokens,), generator=g).tolist()
        labels = [IGNORE] * (args.tokens - 16) + ids[-16:]
        examples.append(TrainingExample(f"x{i}", ids, labels, "", True, []))
    config = TrainConfig(steps=args.steps + 1, batch_size=args.batch_size, lr=1e-4, device=args.device,
                         log_every=1, **CONFIGS[args.one])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    result = train(model, examples, config, progress=False,
                   on_step=lambda step, _loss: times.append(time.perf_counter()))
    seconds = times[-1] - times[0]  # the steps after the first (warm-up)
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"config": args.one, "peak_gib": round(peak / 2**30, 3),
            "tokens_per_s": round(args.batch_size * args.tokens * args.steps / seconds, 1),
            "final_loss": result.final_loss}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    rows = []
    for name in args.configs.split(","):
        command = [sys.executable, __file__, "--one", name, "--model", args.model, "--device", args.device,
                   "--batch-size", str(args.batch_size), "--tokens", str(args.tokens), "--steps", str(args.steps)]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    base = rows[0]
    results = {"machine": machine_info(), "model": args.model, "device": args.device, "batch_size": args.batch_size,
               "tokens": args.tokens, "steps_timed": args.steps, "rows": rows,
               "vs_first": {r["config"]: {"peak": round(r["peak_gib"] / base["peak_gib"], 3),
                                          "tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 3)}
                            for r in rows}}
    print_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
