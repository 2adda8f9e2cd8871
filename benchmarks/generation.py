"""Generation benchmark: batched vs one-at-a-time decoding, mixed-adapter batches, domain switches.

    .venv/bin/python benchmarks/generation.py --model smollm2-135m --out gen-cpu.json          # CPU, real weights
    python benchmarks/generation.py --model random:llama-1b --device cuda --out gen-gpu.json  # GPU, random weights

Every number is tokens generated per second of wall time through retro-peft's own
decode loop (`retro_peft.generation.decode`: prefill the left-padded batch once,
then one forward per token for the whole batch, KV cache). Stop tokens are
disabled so every row generates exactly `--new-tokens` tokens.

- batched: the same prompts decoded as batches of 1, 8 and 32, against decoding
  them one request at a time (the baseline, same run).
- mixed: a batch of 32 rows spread over 8 LoRA adapters through `MixedLoRA`
  (stacked adapters, two batched matmuls per layer), against the same batch on
  one adapter (PEFT's ordinary path), and against PEFT's own mixed-batch path
  (`adapter_names=`).
- switch: time to make another resident adapter active (`set_adapter`).
- `--hf-cache`: the batches again, decoded into transformers' own DynamicCache (it concatenates every layer's
  states at every step) against retro-peft's growing cache (`hf_compat.GrowingLayer`: writes into spare room).
- compiled (`--compile-decode`, CUDA): the batches of 1, 8 and 32 again with
  `StaticDecode` (static KV cache, each decode step one CUDA-graph replay), after
  an untimed run that compiles and records the graphs (its time is reported).
- frozen KV cache (`--kv-cache`): prompts shaped like retrieval-augmented ones (a
  shared head, 3 of 64 stored passages, a question tail; random tokens), decoded
  one at a time and in batches of 8 and 32 three ways: with a full prefill, with
  the passages' stored states put together by `FrozenKVCache.assemble` (timed)
  so that only the tail is prefilled (block layout), and with only the head and
  first passage stored (prefix layout: the rest prefilled, a full prefill's
  computation). Also the time to the first token of one request, each way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from retro_peft.domains.mixed_lora import MixedLoRA
from retro_peft.generation.decode import StaticDecode, decode, decode_steps, left_pad

import plots
from common import RANDOM_CONFIGS, machine_info, timed, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name.startswith("random:"):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**RANDOM_CONFIGS[name.split(":", 1)[1]])).to(dtype)
        return model.eval()
    from retro_peft.models import resolve_generator

    return AutoModelForCausalLM.from_pretrained(resolve_generator(name), dtype=dtype).to(device).eval()


def with_adapters(model, n: int, rank: int):
    from peft import LoraConfig, get_peft_model

    config = lambda: LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)  # noqa: E731
    model = get_peft_model(model, config(), adapter_name="d0")
    for i in range(1, n):
        model.add_adapter(f"d{i}", config())
    dtype = next(p for p in model.parameters()).dtype
    return model.to(dtype).eval()


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Varied lengths (75-100% of `length`) so left padding is exercised as in real batches.
    lengths = torch.randint(int(length * 0.75), length + 1, (n,), generator=g).tolist()
    return [torch.randint(100, vocab - 1, (m,), generator=g).tolist() for m in lengths]


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_rate(run, tokens: int, device: str, repeats: int) -> float:
    """Median of `tokens` / wall seconds of `run()` over `repeats` runs."""
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def tokens_per_second(model, batch_prompts, batch_size: int, new_tokens: int, device: str, repeats: int,
                      mixed: tuple[MixedLoRA, list[str]] | None = None, static: StaticDecode | None = None,
                      empty_cache=None) -> float:
    """Decode every prompt in batches of `batch_size`; median tokens/s over `repeats` runs.
    empty_cache: makes the KV cache each batch decodes into (default: retro-peft's own, `hf_compat.dynamic_cache`)."""
    def run():
        for i in range(0, len(batch_prompts), batch_size):
            ids, mask = left_pad(batch_prompts[i:i + batch_size], 0, device)
            if mixed is None:
                decode(model, ids, mask, max_new_tokens=new_tokens, stop_ids=set(), pad_id=0, static=static,
                       past=empty_cache() if empty_cache else None)
            else:
                with mixed[0].batch(mixed[1][i:i + batch_size]):
                    decode(model, ids, mask, max_new_tokens=new_tokens, stop_ids=set(), pad_id=0)
    return median_rate(run, len(batch_prompts) * new_tokens, device, repeats)


def kv_requests(n: int, length: int, vocab: int, passages: int = 3, pool: int = 64, seed: int = 1):
    """Prompts built like retrieval-augmented ones: a shared head, `passages` of a pool of chunks (each after
    its marker), then a question tail; about `length` tokens in all (75-100%, like `prompts`)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda m: torch.randint(100, vocab - 1, (m,), generator=g).tolist()  # noqa: E731
    head, tail_len = rand(40), 40
    body = max(8, (length - 40 - tail_len) // passages - 3)
    markers = {f"<marker {i}>": rand(3) for i in range(1, passages + 1)}
    chunks = {f"chunk:{i}": rand(int(torch.randint(int(body * 0.7), body + 1, (1,), generator=g))) for i in range(pool)}
    rows = []
    for _ in range(n):
        picks = torch.randperm(pool, generator=g)[:passages].tolist()
        keys = ["<head>"] + [k for i, c in enumerate(picks, 1) for k in (f"<marker {i}>", f"chunk:{c}")]
        rows.append((keys, rand(int(torch.randint(tail_len // 2, tail_len + 1, (1,), generator=g)))))
    return head, {**markers, **chunks}, rows


def kv_tokens_per_second(model, cache, rows, batch_size: int, new_tokens: int, device: str, repeats: int,
                         static=None) -> float:
    """Like `tokens_per_second`, each batch's context assembled from the frozen cache (timed) and only the
    tails prefilled (static: decode with `StaticDecode`, the context copied into its static cache)."""
    def run():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            past, context_mask = cache.assemble([keys for keys, _ in chunk], device)
            ids, mask = left_pad([tail for _, tail in chunk], 0, device)
            decode(model, ids, torch.cat([context_mask, mask], dim=1), max_new_tokens=new_tokens, stop_ids=set(),
                   pad_id=0, past=past, static=static)
    return median_rate(run, len(rows) * new_tokens, device, repeats)


class PeftMixed:
    """Calls the model with PEFT's own mixed-batch argument `adapter_names`."""

    def __init__(self, model, names):
        self.model, self.names = model, names

    def get_base_model(self):
        return self.model.get_base_model()

    def __call__(self, **kw):
        return self.model(**kw, adapter_names=self.names)


def time_to_first_token(model, cache, rows, device: str) -> float:
    """Median ms from a single request's arrival (its token ids, or its stored segments + tail) to its first
    new token: context assembly (with a cache) and prefill."""
    times = []
    for keys, tail in rows:
        sync(device)
        start = time.perf_counter()
        past = None
        if cache is not None:  # as the batch runner assembles a pass (a recomputing layout's pass included)
            past, context_mask, (tail,) = cache.assemble_rows([(cache, keys)], model, tails=[tail])
        ids, mask = left_pad([tail], 0, device)
        if cache is not None:
            mask = torch.cat([context_mask, mask], dim=1)
        next(decode_steps(model, ids, mask, max_new_tokens=1, stop_ids=set(), pad_id=0, past=past))
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


BLEND_TOKENS = (4, 16, 64)  # the blend layout's recompute_tokens measured (time to first token)
DEVIATION_RATIOS = (0.05, 0.15, 0.3)  # the deviation layout's recompute_ratio measured
SOFT_TOKENS = 8  # soft tokens after each stored passage (`kvcache.soft`; speed does not depend on their values)


def blend_ttft(model, cache, rows, full, device: str, soft_cache=None) -> dict:
    """Time to first token: full prefill, the block layout (with SOFT_TOKENS soft tokens after each passage too,
    `soft_cache`), the blend layout at each of BLEND_TOKENS and the deviation layout at each of DEVIATION_RATIOS."""
    out = {"full": time_to_first_token(model, None, [(None, ids) for ids in full], device),
           "kv": time_to_first_token(model, cache, rows, device)}
    if soft_cache is not None:
        out[f"kv_soft_{SOFT_TOKENS}"] = time_to_first_token(model, soft_cache, rows, device)
    for m in BLEND_TOKENS:
        out[f"blend_{m}"] = time_to_first_token(model, cache.with_layout("blend", m), rows, device)
    for r in DEVIATION_RATIOS:
        out[f"deviation_{r}"] = time_to_first_token(model, cache.with_layout("deviation", recompute_ratio=r), rows,
                                                    device)
    return out


def kv_section(model, args, vocab: int) -> dict:
    """Batch sizes 1/8/32 and one at a time with the frozen KV cache, against full prefill of the same prompts."""
    from retro_peft.kvcache import FrozenKVCache

    head, segments, rows = kv_requests(args.requests, args.prompt_tokens, vocab)
    start = time.perf_counter()
    cache = FrozenKVCache.from_segments(model, head, segments).attach(model)
    build_s = time.perf_counter() - start
    full = [[t for k in keys for t in cache.token_ids[k]] + tail for keys, tail in rows]  # the same prompts, whole
    if args.kv_ttft_only:
        from retro_peft.kvcache.soft import SoftTokens

        soft = SoftTokens.initial(model, SOFT_TOKENS, head[:1])
        soft_cache = FrozenKVCache.from_segments(model, head, segments, soft=soft).attach(model)
        time_to_first_token(model, cache, rows[:2], args.device)  # warm-up
        ttft = blend_ttft(model, cache, rows, full, args.device, soft_cache)
        print(f"time to first token, one request (median of {len(rows)}): "
              + ", ".join(f"{k} {v:.1f} ms ({ttft['full'] / v:.2f}x full)" for k, v in ttft.items()))
        return {"segments": len(segments), "build_s": build_s, "prompt_tokens_mean": statistics.mean(map(len, full)),
                "tail_tokens_mean": statistics.mean(len(t) for _, t in rows), "ttft_ms": ttft}
    kv_tokens_per_second(model, cache, rows[:2], 2, 2, args.device, 1)  # warm-up
    out = {"segments": len(segments), "build_s": build_s, "prompt_tokens_mean": statistics.mean(map(len, full)),
           "tail_tokens_mean": statistics.mean(len(t) for _, t in rows)}
    out["full_one_at_a_time_tok_s"] = tokens_per_second(model, full, 1, args.new_tokens, args.device, args.repeats)
    out["kv_one_at_a_time_tok_s"] = kv_tokens_per_second(model, cache, rows, 1, args.new_tokens, args.device,
                                                         args.repeats)
    out["full_batched_tok_s"], out["kv_batched_tok_s"] = {}, {}
    for bsz in (8, 32):
        if bsz <= args.requests:
            out["full_batched_tok_s"][bsz] = tokens_per_second(model, full, bsz, args.new_tokens, args.device,
                                                               args.repeats)
            out["kv_batched_tok_s"][bsz] = kv_tokens_per_second(model, cache, rows, bsz, args.new_tokens,
                                                                args.device, args.repeats)
    if args.compile_decode:  # both again with StaticDecode (CUDA graphs), after an untimed compiling run each
        static, compiled, first_run_s = StaticDecode(model), {"full": {}, "kv": {}}, {"full": {}, "kv": {}}
        for bsz in (1, 8, 32):
            if bsz > args.requests:
                continue
            runs = {"full": partial(tokens_per_second, model, full, bsz, args.new_tokens, args.device, static=static),
                    "kv": partial(kv_tokens_per_second, model, cache, rows, bsz, args.new_tokens, args.device,
                                  static=static)}
            for label, run in runs.items():  # run(repeats): median tokens/s; the first run compiles and records
                first_run_s[label][bsz], _ = timed(run, 1)
                compiled[label][bsz] = run(args.repeats)
        out["compiled_decode"] = {"tok_s": compiled, "first_run_s": first_run_s,
                                  "kv_vs_full_same_batch": {b: compiled["kv"][b] / compiled["full"][b]
                                                            for b in compiled["kv"]},
                                  "kv_vs_eager_kv_one_at_a_time": {b: r / out["kv_one_at_a_time_tok_s"]
                                                                   for b, r in compiled["kv"].items()}}
        print("| compiled static decode | full prefill tokens/s | frozen KV cache tokens/s | cache vs full |")
        for bsz, rate in compiled["kv"].items():
            print(f"| batch {bsz} | {compiled['full'][bsz]:.1f} | {rate:.1f} | {rate / compiled['full'][bsz]:.2f}x |")
    # The prefix layout: head, "[1]" and the first passage from the store, the rest prefilled over them
    # (a full prefill's own computation: same answers).
    prefix = [(keys[:3], [t for k in keys[3:] for t in cache.token_ids[k]] + tail) for keys, tail in rows]
    out["prefix_one_at_a_time_tok_s"] = kv_tokens_per_second(model, cache, prefix, 1, args.new_tokens, args.device,
                                                             args.repeats)
    out["prefix_batched_tok_s"] = {b: kv_tokens_per_second(model, cache, prefix, b, args.new_tokens, args.device,
                                                           args.repeats) for b in out["kv_batched_tok_s"]}
    out["prefix_batched_vs_prefix_one"] = {b: r / out["prefix_one_at_a_time_tok_s"]
                                           for b, r in out["prefix_batched_tok_s"].items()}
    out["prefix_vs_full_same_batch"] = {1: out["prefix_one_at_a_time_tok_s"] / out["full_one_at_a_time_tok_s"],
                                        **{b: r / out["full_batched_tok_s"][b]
                                           for b, r in out["prefix_batched_tok_s"].items()}}
    out["ttft_ms"] = {**blend_ttft(model, cache, rows, full, args.device),
                      "prefix": time_to_first_token(model, cache, prefix, args.device)}
    one = out["kv_one_at_a_time_tok_s"]
    out["kv_batched_vs_kv_one"] = {b: r / one for b, r in out["kv_batched_tok_s"].items()}
    out["kv_vs_full_same_batch"] = {1: one / out["full_one_at_a_time_tok_s"],
                                    **{b: r / out["full_batched_tok_s"][b] for b, r in out["kv_batched_tok_s"].items()}}
    print(f"\ntime to first token, one request (median of {len(rows)}): full prefill {out['ttft_ms']['full']:.1f} ms, "
          f"frozen KV cache {out['ttft_ms']['kv']:.1f} ms, prefix layout {out['ttft_ms']['prefix']:.1f} ms")
    print(f"\nfrozen KV cache ({len(segments)} stored segments, built in {build_s:.1f} s; prompts "
          f"{out['prompt_tokens_mean']:.0f} tokens, of which {out['tail_tokens_mean']:.0f} prefilled)")
    print("| decoding | full prefill tokens/s | frozen KV cache tokens/s | cache vs full |\n|---|---:|---:|---:|")
    print(f"| one at a time | {out['full_one_at_a_time_tok_s']:.1f} | {one:.1f} | {out['kv_vs_full_same_batch'][1]:.2f}x |")
    for bsz, rate in out["kv_batched_tok_s"].items():
        print(f"| batch {bsz} | {out['full_batched_tok_s'][bsz]:.1f} | {rate:.1f} ({rate / one:.2f}x one at a time) | "
              f"{out['kv_vs_full_same_batch'][bsz]:.2f}x |")
    print(f"prefix layout: one at a time {out['prefix_one_at_a_time_tok_s']:.1f}, " + ", ".join(
        f"batch {b} {r:.1f} ({out['prefix_batched_vs_prefix_one'][b]:.2f}x its one at a time, "
        f"{out['prefix_vs_full_same_batch'][b]:.2f}x full)" for b, r in out["prefix_batched_tok_s"].items()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged/HF model, or random:llama-1b / random:smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--prompt-tokens", type=int, default=384)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    p.add_argument("--compile-decode", action="store_true", help="also decode with StaticDecode (CUDA graphs; CUDA only)")
    p.add_argument("--kv-cache", action="store_true",
                   help="also decode from a frozen KV cache (stored passage states; only the question prefilled)")
    p.add_argument("--kv-only", action="store_true", help="run only the frozen KV cache section")
    p.add_argument("--kv-ttft-only", action="store_true",
                   help="with --kv-only: only time to first token (full prefill, block, blend layouts)")
    p.add_argument("--hf-cache", action="store_true",
                   help="also decode the batches into transformers' own DynamicCache (the growing cache's baseline)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.requests, args.repeats = 32, 4, 8, 1
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    torch.set_grad_enabled(False)

    base = load_model(args.model, args.device, dtype)
    vocab = base.config.vocab_size
    model = with_adapters(base, args.adapters, args.rank)
    model.set_adapter("d0")
    reqs = prompts(args.requests, args.prompt_tokens, vocab)
    machine = machine_info()
    results = {"model": args.model, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
               "gpu": machine["gpu"] if args.device.startswith("cuda") else None,
               "cpu": machine["cpu"], "threads": machine["torch_threads"],
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "requests": args.requests}

    if args.kv_only:
        results["kv_cache"] = kv_section(model, args, vocab)
        if args.out:
            write_json(args.out, results)
            plots.chart_beside(args.out, results, plots.generation)
        return 0

    tokens_per_second(model, reqs[:2], 2, 2, args.device, 1)  # warm-up
    one = tokens_per_second(model, reqs, 1, args.new_tokens, args.device, args.repeats)
    batched = {b: tokens_per_second(model, reqs, b, args.new_tokens, args.device, args.repeats)
               for b in (1, 8, 32) if b <= args.requests}
    results["one_at_a_time_tok_s"] = one
    results["batched_tok_s"] = batched
    results["batched_speedup"] = {b: r / one for b, r in batched.items()}
    if args.hf_cache:  # the baseline of the growing cache: transformers' DynamicCache, concatenated every step
        from transformers import DynamicCache

        concatenating = {b: tokens_per_second(model, reqs, b, args.new_tokens, args.device, args.repeats,
                                              empty_cache=DynamicCache) for b in batched}
        results["hf_dynamic_cache"] = {"tok_s": concatenating,
                                       "growing_vs_hf": {b: batched[b] / concatenating[b] for b in batched}}
    if args.compile_decode:
        static, compiled, compile_s = StaticDecode(model), {}, {}
        for bsz in batched:
            start = time.perf_counter()
            tokens_per_second(model, reqs, bsz, args.new_tokens, args.device, 1, static=static)  # compile, record
            compile_s[bsz] = time.perf_counter() - start
            compiled[bsz] = tokens_per_second(model, reqs, bsz, args.new_tokens, args.device, args.repeats,
                                              static=static)
        results["compiled_decode"] = {"tok_s": compiled, "vs_eager_same_batch": {b: compiled[b] / batched[b]
                                                                                 for b in compiled},
                                      "vs_one_at_a_time": {b: r / one for b, r in compiled.items()},
                                      "first_run_s": compile_s}

    if args.kv_cache:
        results["kv_cache"] = kv_section(model, args, vocab)

    b = min(32, args.requests)
    names = [f"d{i % args.adapters}" for i in range(args.requests)]
    single = tokens_per_second(model, reqs, b, args.new_tokens, args.device, args.repeats)
    mixed = tokens_per_second(model, reqs, b, args.new_tokens, args.device, args.repeats,
                              mixed=(MixedLoRA(model), names))
    def peft_mixed():
        for i in range(0, len(reqs), b):
            ids, mask = left_pad(reqs[i:i + b], 0, args.device)
            decode(PeftMixed(model, names[i:i + b]), ids, mask, max_new_tokens=args.new_tokens, stop_ids=set(), pad_id=0)
    peft_rate = median_rate(peft_mixed, len(reqs) * args.new_tokens, args.device, args.repeats)
    results["mixed"] = {"batch": b, "adapters": args.adapters, "single_adapter_tok_s": single,
                        "mixed_retro_tok_s": mixed, "mixed_peft_tok_s": peft_rate,
                        "retro_vs_single": mixed / single, "peft_vs_single": peft_rate / single}

    switches = []
    for i in range(200):
        start = time.perf_counter()
        model.set_adapter(f"d{i % args.adapters}")
        switches.append(time.perf_counter() - start)
    results["switch_ms"] = {"p50": 1000 * statistics.median(switches), "max": 1000 * max(switches)}

    print(f"\n{args.model} on {args.device} ({results['dtype']}), prompts ~{args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, {args.requests} requests")
    print("| decoding | tokens/s | vs one at a time |\n|---|---:|---:|")
    print(f"| one request at a time | {one:.1f} | 1.00x |")
    for bsz, rate in batched.items():
        print(f"| batch {bsz} | {rate:.1f} | {rate / one:.2f}x |")
    for bsz, rate in results.get("hf_dynamic_cache", {}).get("tok_s", {}).items():
        print(f"| batch {bsz}, transformers' DynamicCache (concatenating) | {rate:.1f} | {rate / one:.2f}x |")
    for bsz, rate in results.get("compiled_decode", {}).get("tok_s", {}).items():
        print(f"| batch {bsz}, compiled static decode | {rate:.1f} | {rate / one:.2f}x |")
    m = results["mixed"]
    print(f"\n| batch {b}, {args.adapters} adapters | tokens/s | vs single adapter |\n|---|---:|---:|")
    print(f"| single adapter (PEFT) | {single:.1f} | 1.00x |")
    print(f"| mixed, retro-peft MixedLoRA | {mixed:.1f} | {m['retro_vs_single']:.2f}x |")
    print(f"| mixed, PEFT adapter_names | {m['mixed_peft_tok_s']:.1f} | {m['peft_vs_single']:.2f}x |")
    print(f"\nswitch active adapter: p50 {results['switch_ms']['p50']:.3f} ms, max {results['switch_ms']['max']:.3f} ms")
    if args.out:
        write_json(args.out, results)
        plots.chart_beside(args.out, results, plots.generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
