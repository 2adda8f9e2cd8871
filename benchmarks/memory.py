"""Training memory: peak memory and tokens/s of retro-peft's `train()`: full precision or a 4-bit (QLoRA) base,
with and without gradient checkpointing, eager or compiled.

    .venv/bin/python benchmarks/memory.py --out benchmarks/results/memory-cpu-smollm2.json      # CPU, real SmolLM2
    python benchmarks/memory.py --model random:llama-8b --device cuda --configs gpu \\
        --out benchmarks/results/memory-gpu-8b.json                                             # GPU, 8B shape

Each configuration runs in its own process (peak memory is per process): LoRA r 16 on all 7 projections of the
model, batches of `--batch-size` examples of `--tokens` random tokens with the answer loss on the last 16,
`--steps` optimizer steps after one warm-up step (which holds the compile, when compiled). Peak memory: the
process's maximum resident set on the CPU (`ru_maxrss`, the model's weights included),
`torch.cuda.max_memory_allocated` on a GPU (weights, adapter, optimizer state and activations). tokens/s: the
timed steps' tokens over their wall time.

Configurations (`--configs`, comma-separated, or `gpu` for eight): plain (the weights in bfloat16 on a GPU,
float32 on the CPU), checkpointing, 4bit (`--quantize 4bit`: NF4 base, bfloat16 compute), 4bit+checkpointing,
and each of them +compile; also 8bit, checkpointing-F (only the fraction F of the layers recomputed) and
checkpointing-selective (every layer, the large matrix products' and attention's outputs kept). A configuration
that fails (e.g. a combination the GPU stack cannot compile) becomes a row with its error; the others still run.

`random:NAME` (a shape of common.RANDOM_CONFIGS) needs no packaged weights: the random model is built once, saved
with a stand-in tokenizer (the loop reads only its padding id) under --scratch, and every configuration loads it
from there the way `retro-peft train` loads a model (quantized by bitsandbytes while loading, for the 4bit rows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RANDOM_CONFIGS, SCRATCH, machine_info, print_json

BASE_CONFIGS = ("plain", "checkpointing", "4bit", "4bit+checkpointing")
GPU_CONFIGS = ",".join([*BASE_CONFIGS, *(f"{name}+compile" for name in BASE_CONFIGS)])  # `--configs gpu`: 8 rows
PARTS = ("plain, checkpointing, checkpointing-F (F: the fraction of layers recomputed) or checkpointing-selective, "
         "4bit, 8bit, compile")


def options_of(name: str) -> dict:
    """A configuration's TrainConfig options from its name: parts joined by "+", e.g. 4bit+checkpointing-0.75."""
    options: dict = {}
    for part in name.split("+"):
        if part == "plain":
            continue
        if part in ("4bit", "8bit"):
            options["quantize"] = part
        elif part == "compile":
            options["compile"] = True
        elif part == "checkpointing" or part.startswith("checkpointing-"):
            fraction = part.removeprefix("checkpointing").removeprefix("-") or "1"
            try:
                options["gradient_checkpointing"] = fraction if fraction == "selective" else float(fraction)
            except ValueError:
                raise SystemExit(f"configuration {name!r}: {part!r} is not checkpointing-<fraction> or "
                                 "checkpointing-selective") from None
        else:
            raise SystemExit(f"configuration {name!r}: unknown part {part!r} (parts: {PARTS})")
    return options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m",
                   help=f"packaged/HF model or folder, or random:NAME ({', '.join(RANDOM_CONFIGS)})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokens", type=int, default=700)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--configs", default="plain,checkpointing", help=f"comma-separated names, parts joined by + ({PARTS}); "
                                                                    "or gpu (all of them)")
    p.add_argument("--scratch", type=Path, default=SCRATCH / "memory-models", help="where random:NAME is saved")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration in this process (the child)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def weights_dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def random_model_folder(name: str, device: str, scratch: Path) -> Path:
    """random:NAME built once (random weights, in the dtype the rows load it in) and saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = name.split(":", 1)[1]
    folder = scratch / f"{shape}-{str(weights_dtype(device)).removeprefix('torch.')}"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(weights_dtype(device))  # built in its dtype: an 8B model in float32 is 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**RANDOM_CONFIGS[shape], pad_token_id=0))
    finally:
        torch.set_default_dtype(default)
    # a stand-in tokenizer: training reads only the padding id (the examples are random token ids)
    vocab = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<pad>")
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def run_one(args) -> dict:
    import resource

    import torch

    from retro_peft.adapters import RetroPeftModel, config_for_method
    from retro_peft.training import TrainConfig, train
    from retro_peft.training.data import IGNORE, TrainingExample

    options = options_of(args.one)
    # a quantized base is placed on the device while loading; a full-precision one is moved there by train()
    model = RetroPeftModel.create(args.model, config_for_method("lora", steps=args.steps + 1), seed=0,
                                  dtype=weights_dtype(args.device), quantize=options.get("quantize"),
                                  device=args.device if options.get("quantize") else None)
    vocab = model.model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(args.batch_size * (args.steps + 1)):
        ids = torch.randint(100, vocab - 1, (args.tokens,), generator=g).tolist()
        labels = [IGNORE] * (args.tokens - 16) + ids[-16:]
        examples.append(TrainingExample(f"x{i}", ids, labels, "", True, []))
    config = TrainConfig(steps=args.steps + 1, batch_size=args.batch_size, lr=1e-4, device=args.device,
                         log_every=1, **options)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    result = train(model, examples, config, progress=False,
                   on_step=lambda step, _loss: times.append(time.perf_counter()))
    seconds = times[-1] - times[0]  # the steps after the first (warm-up, compile)
    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"config": args.one, "peak_gib": round(peak / 2**30, 3),
            "tokens_per_s": round(args.batch_size * args.tokens * args.steps / seconds, 1),
            "final_loss": result.final_loss}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    names = (GPU_CONFIGS if args.configs == "gpu" else args.configs).split(",")
    for name in names:
        options_of(name)  # a bad name fails before any model is built
    model = args.model
    if model.startswith("random:"):
        if model.split(":", 1)[1] not in RANDOM_CONFIGS:
            raise SystemExit(f"unknown shape {model}: use random:{', random:'.join(RANDOM_CONFIGS)}")
        model = str(random_model_folder(model, args.device, args.scratch))
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--model", model, "--device", args.device,
                   "--batch-size", str(args.batch_size), "--tokens", str(args.tokens), "--steps", str(args.steps)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:  # e.g. out of memory, or a combination that does not compile: recorded, the other rows still run
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            rows.append({"config": name, "error": lines[-1] if lines else f"exit status {proc.returncode}"})
        print(rows[-1], file=sys.stderr)
    ok = [r for r in rows if "error" not in r]
    base = ok[0] if ok else None
    results = {"machine": machine_info(), "model": args.model, "device": args.device, "batch_size": args.batch_size,
               "tokens": args.tokens, "steps_timed": args.steps, "rows": rows,
               "vs_first": {r["config"]: {"peak": round(r["peak_gib"] / base["peak_gib"], 3),
                                          "tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 3)}
                            for r in ok}}
    print_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
