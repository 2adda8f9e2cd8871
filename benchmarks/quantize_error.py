"""How far each way of quantizing the base's weights moves its next-token distribution (CPU, real weights).

    .venv/bin/python benchmarks/quantize_error.py --out benchmarks/results/quantize-error-cpu-smollm2.json

Why: a QLoRA adapter trains on, and answers from, the quantized base, so the base's own error is where its
quality gap starts. This measures that error directly, before any training: for each variant, the weights of
every decoder linear layer are replaced by their quantized-then-dequantized values (bitsandbytes' own
`quantize_4bit` / `dequantize_4bit`, as `--quantize 4bit` stores them) and the model reads texts it was not
tuned on: 8 Wikipedia leads (a fixed random draw) and 8 passages of SQuAD's training articles (0-2; the
evaluation articles 3-4 are not read), 256 tokens each. Reported per variant: the mean KL(float32 || variant)
of the next-token distributions, the mean negative log-likelihood of the text, and how often the most likely
next token is the same as float32's.

Variants: NF4 as `--quantize 4bit` (blocks of 64, double quantization), without double quantization, FP4,
blocks of 32, 8-bit (per row absmax, as LLM.int8()'s weights apart from its outliers), LoftQ's initialisation at
rank 16 and 64 (the adapter starting at the quantization residual's top singular vectors, as peft's
`replace_lora_weights_loftq` sets it), NF4 with one kind of projection kept in float32 (`--quantize-skip`),
with the cheap ones combined (k_proj and v_proj are small in a grouped-query model), and, with
`--scan-layers`, NF4 with one whole decoder layer kept (which depths are sensitive). Each row also says what
share of the decoder's linear weights it keeps unquantized: what it costs in memory.

With `--gptq DIR`: two more rows loaded the way `--quantize 4bit` loads (bitsandbytes' Linear4bit, on the CPU):
the base as it is, and the folder `retro-peft gptq` wrote at DIR (rounded by GPTQ on calibration texts), both
with the folder's recorded `--quantize-skip`. `--calibration-out FILE` writes the calibration texts used for
BENCHMARKS.md's folder: 500 Wikipedia leads of the same shuffle, none of them among the measured ones.

    .venv/bin/python benchmarks/quantize_error.py --calibration-out .bench/calibration-leads.jsonl
    .venv/bin/retro-peft gptq smollm2-135m --calibration .bench/calibration-leads.jsonl --samples 32 --tokens 256 \
        --quantize-skip down_proj,k_proj,v_proj --out .bench/smollm2-gptq-dkv
    .venv/bin/python benchmarks/quantize_error.py --gptq .bench/smollm2-gptq-dkv --only-loaded --out ...
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

from common import DATA, SQUAD, machine_info, write_json

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


CALIBRATION_LEADS = slice(100, 600)  # after the measured leads (at most the first 100) of the same shuffle


def shuffled_leads() -> list[str]:
    leads = [json.loads(line)["text"] for line in open(DATA / "wikipedia-vital-10k-en.jsonl")]
    random.Random(0).shuffle(leads)
    return leads


def texts(n: int) -> dict[str, list[str]]:
    leads = shuffled_leads()
    squad = json.load(open(SQUAD))["data"][:3]  # the training articles only
    passages = [p["context"] for article in squad for p in article["paragraphs"]]
    random.Random(0).shuffle(passages)
    return {"wikipedia": leads[:n], "squad_train": passages[:n]}


def nf4(weight, blocksize=64, quant_type="nf4", double=True):
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.contiguous(), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double)
    return F.dequantize_4bit(packed, state).float()


def int8_rows(weight):
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(weight / scale) * scale


def loftq(weight, rank):
    """NF4 plus the rank-`rank` part of its residual (what the adapter starts from under LoftQ)."""
    dequantized = nf4(weight)
    u, s, vh = torch.linalg.svd(weight - dequantized, full_matrices=False)
    return dequantized + (u[:, :rank] * s[:rank]) @ vh[:rank]


def keeping(*suffixes):
    """Whether a linear layer is quantized when the layers ending in `suffixes` are kept (--quantize-skip)."""
    return lambda name: not any(name.endswith("." + suffix) for suffix in suffixes)


def variants(layers: int, scan_layers: bool) -> dict:
    every = keeping()  # every decoder linear layer quantized
    table = {"nf4 (--quantize 4bit)": (nf4, every),
             "nf4, no double quantization": (lambda w: nf4(w, double=False), every),
             "fp4": (lambda w: nf4(w, quant_type="fp4"), every),
             "nf4, blocks of 32": (lambda w: nf4(w, blocksize=32), every),
             "int8 per row": (int8_rows, every),
             "nf4 + LoftQ rank 16": (lambda w: loftq(w, 16), every),
             "nf4 + LoftQ rank 64": (lambda w: loftq(w, 64), every)}
    for kept in PROJECTIONS:
        table[f"nf4, {kept} kept"] = (nf4, keeping(kept))
    for kept in (("k_proj", "v_proj"), ("down_proj", "v_proj"), ("down_proj", "k_proj", "v_proj")):
        table[f"nf4, {' and '.join(kept)} kept"] = (nf4, keeping(*kept))
    if scan_layers:
        for i in range(layers):
            table[f"nf4, layer {i} kept"] = (nf4, lambda name, i=i: f".layers.{i}." not in name)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", type=int, default=8, help="texts of each set")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--scan-layers", action="store_true", help="also one row per decoder layer kept whole")
    p.add_argument("--gptq", type=Path, metavar="DIR", help="also rows loaded as --quantize 4bit: the base, and the "
                                                             "folder `retro-peft gptq` wrote at DIR")
    p.add_argument("--only-loaded", action="store_true", help="with --gptq: only those two rows")
    p.add_argument("--calibration-out", type=Path, metavar="FILE", help="write the calibration leads (jsonl) and exit")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.texts > CALIBRATION_LEADS.start:
        p.error(f"--texts at most {CALIBRATION_LEADS.start}: the calibration leads follow the measured ones")
    if args.calibration_out:
        args.calibration_out.parent.mkdir(parents=True, exist_ok=True)
        args.calibration_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in shuffled_leads()[CALIBRATION_LEADS]))
        return 0
    from retro_peft.base_model import ROUNDING_RECORD, load_base_model

    torch.manual_seed(0)
    model, tokenizer, _ = load_base_model(args.model, dtype=torch.float32, device="cpu")
    model.eval()
    sets = {name: [tokenizer(t, return_tensors="pt").input_ids[:, :args.tokens] for t in items]
            for name, items in texts(args.texts).items()}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]

    @torch.no_grad()
    def log_probs(m):
        return {name: [torch.log_softmax(m(input_ids=ids).logits.float(), -1) for ids in batch]
                for name, batch in sets.items()}

    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in linears}
    reference = log_probs(model)
    out = {"model": args.model, **machine_info(), "texts": args.texts, "tokens": args.tokens, "variants": {}}
    print("| weights | set | KL(float32 \\|\\| variant) | NLL | top-1 agreement |\n| --- | --- | ---: | ---: | ---: |")
    table = {} if args.only_loaded else variants(model.config.num_hidden_layers, args.scan_layers)
    if args.gptq:
        skip = tuple(json.loads((args.gptq / ROUNDING_RECORD).read_text())["quantize_skip"])
        kept = f", {', '.join(skip)} kept" if skip else ""
        table[f"loaded --quantize 4bit{kept}"] = ("loaded", args.model, skip)
        table[f"loaded --quantize 4bit, rounded by retro-peft gptq{kept}"] = ("loaded", str(args.gptq), skip)
    for label, (quantize, applies, *loaded) in {"float32": (None, None), **table}.items():
        start = time.perf_counter()
        variant = model
        if quantize == "loaded":  # bitsandbytes' own layers, as train / ask load them
            variant = load_base_model(applies, dtype=torch.float32, device="cpu", quantize="4bit",
                                      quantize_skip=loaded[0])[0].eval()
            applies = keeping(*loaded[0])
        elif quantize is not None:
            variant = copy.deepcopy(model)
            for name, module in variant.named_modules():
                if name in linears and applies(name):
                    module.weight.data.copy_(quantize(module.weight.data.float()))
        found = log_probs(variant)
        row = {}
        for name, batch in sets.items():
            pairs = list(zip(reference[name], found[name], batch))
            row[name] = {
                "kl": sum((r.exp() * (r - f)).sum(-1).mean().item() for r, f, _ in pairs) / len(pairs),
                "nll": sum(-f[0, :-1].gather(-1, ids[0, 1:, None]).mean().item() for _, f, ids in pairs) / len(pairs),
                "top1_agreement": sum((f.argmax(-1) == r.argmax(-1)).float().mean().item()
                                      for r, f, _ in pairs) / len(pairs)}
            print(f"| {label} | {name} | {row[name]['kl']:.3f} | {row[name]['nll']:.3f} | "
                  f"{row[name]['top1_agreement']:.1%} |", flush=True)
        kept = 1.0 if quantize is None else sum(n for name, n in sizes.items() if not applies(name)) / sum(sizes.values())
        row["kept_unquantized"] = round(kept, 4)  # share of the decoder's linear weights
        row["seconds"] = round(time.perf_counter() - start, 1)
        out["variants"][label] = row
        if args.out:
            write_json(args.out, out)
        del variant
    return 0


if __name__ == "__main__":
    sys.exit(main())
