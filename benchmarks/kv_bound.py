"""The frozen KV cache against the machine's bounds: time to first token, and batch-1 decoding.

    python benchmarks/kv_bound.py --model random:llama-8b --device cuda --out kv-bound-gpu-8b.json
    python benchmarks/kv_bound.py --model random:llama-1b --device cuda --out kv-bound-gpu-1b.json
    .venv/bin/python benchmarks/kv_bound.py --model smollm2-135m --out kv-bound-cpu-smollm2.json  # real weights

A request is shaped like a retrieval-augmented prompt: a 40-token head, 8 stored passages of 256 tokens
(drawn from a pool of 32; random tokens), a 32-token question. Each row is timed through retro-peft's own
code (`FrozenKVCache.assemble_rows`, `decode_steps`, `StaticDecode`), the median over `--requests`
requests after untimed warm-up runs (which compile the graphs: their time is reported), with a LoRA adapter
(rank 16 on all 7 projections) active, as a domain is served. Decode tokens/s is timed within each request,
from the host having its first token to having its last (until 2026-12-07: the difference of the median
whole request and the median first token, which a CPU's spread of full-prefill times made unreliable):

- full prefill: the whole prompt through the model (eager; the baseline);
- frozen KV cache, eager: the context assembled from the store, only the question prefilled;
- frozen KV cache, compiled: the same through `StaticDecode` (the question's prefill and every decode step
  one CUDA-graph replay; CUDA only);
- batch-1 decoding after the prefill: eager, compiled with the host reading every token (sync_every 1),
  compiled with the host reading once per `SYNC_EVERY` tokens (the default: grouped attention for the step and
  the question's prefill), the same with q/k/v and gate/up fused into one matmul each (`cached_compiled_fused`),
  and with transformers' SDPA over repeated key/value heads (`cached_compiled_before`, the step as transformers
  traces it); and the static cache refilled layer by layer through transformers' own `reset` and `update`
  (`cached_compiled_layerwise`) instead of `hf_compat.refill_static`'s few batched calls; and the default graphs
  compiled with inductor's coordinate-descent tuning (`cached_compiled_tuned`), with max-autotune's timed choice of
  each matmul's kernel too (`cached_compiled_autotune`), and that with fused projections
  (`cached_compiled_fused_autotune`); and short queries through PyTorch's flex_attention (`cached_compiled_flex`:
  its flash-decoding kernel, the mask built outside the graph). Each compiled row's greedy tokens are compared with the eager cached
  path's (`tokens_as_eager`: the first token equal, and how many of the first tokens agree; random weights
  give flat logits, so rounding alone can flip a later one); with `--profile`, each compiled row's request
  is profiled too.

Every row is printed beside its bound from the same run's measured rates: the larger of its FLOPs / the
measured matmul rate and its bytes / the measured read bandwidth (all weights once, plus the context's
keys and values). Also the cache's build time and bytes per stored token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from retro_peft.generation.decode import SYNC_EVERY, StaticDecode, decode_steps, left_pad
from retro_peft.kvcache import FrozenKVCache

import plots
from common import machine_info, write_json
from generation import load_model, sync, with_adapters


# inductor options of the tuned rows (StaticDecode(compile_options=...)): each non-matmul kernel's launch
# configuration tuned by timing its neighbours; then also every matmul's kernel chosen by timing cuBLAS against
# Triton's templates, which can fuse the product with what follows it
TUNED = {"coordinate_descent_tuning": True}
AUTOTUNE = {"coordinate_descent_tuning": True, "max_autotune": True}
# the compiled rows with their own graphs: StaticDecode's options beyond the default's; "blas" is not one of them
# but torch's preferred BLAS library while the row compiles and runs (cuBLASLt chooses its batch-1 kernels by
# other heuristics than cuBLAS, whose split-K reduce kernels take a share of the decode step)
VARIANTS = {"cached_compiled_fused": {"fused_projections": True},
            "cached_compiled_flex": {"decode_attention": "flex"},
            "cached_compiled_cublaslt": {"blas": "cublaslt"},
            "cached_compiled_flex_cublaslt": {"decode_attention": "flex", "blas": "cublaslt"},
            "cached_compiled_flex_fused": {"decode_attention": "flex", "fused_projections": True},
            "cached_compiled_before": {"decode_attention": None},  # the step as transformers traces it
            "cached_compiled_tuned": {"compile_options": TUNED},
            "cached_compiled_autotune": {"compile_options": AUTOTUNE},
            "cached_compiled_fused_autotune": {"fused_projections": True, "compile_options": AUTOTUNE}}
ROWS = ("full_eager", "cached_eager", "cached_compiled_sync1", "cached_compiled", "cached_compiled_layerwise",
        *VARIANTS, "full_compiled")
EAGER_DECODE_TOKENS = 16  # the eager rows decode fewer tokens: at tens of tokens/s more only costs time


def matmul_rate(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul (the best of `repeats`)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def read_bandwidth(device: str, dtype: torch.dtype, gib: float, repeats: int = 10) -> float:
    """Measured bytes/s of reading a `gib`-GiB tensor once (a sum over it; the best of `repeats`)."""
    x = torch.ones(int(gib * 2 ** 30) // torch.tensor([], dtype=dtype).element_size(), device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def requests(n: int, vocab: int, *, head: int, passages: int, passage_tokens: int, pool: int, question: int,
             seed: int = 1):
    """(head ids, {segment key: ids}, [(segment keys, question ids)] per request)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda m: torch.randint(100, vocab - 1, (m,), generator=g).tolist()  # noqa: E731
    segments = {f"<marker {i}>": rand(3) for i in range(1, passages + 1)}
    segments.update({f"chunk:{i}": rand(passage_tokens) for i in range(pool)})
    rows = []
    for _ in range(n):
        picks = torch.randperm(pool, generator=g)[:passages].tolist()
        keys = ["<head>"] + [k for i, c in enumerate(picks, 1) for k in (f"<marker {i}>", f"chunk:{c}")]
        rows.append((keys, rand(question)))
    return rand(head), segments, rows


def median_ms(run, rows, device: str) -> float:
    times = []
    for row in rows:
        sync(device)
        start = time.perf_counter()
        run(row)
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


class Request:
    """One request's first token, and its first `tokens` tokens, through the full prompt or the cache."""

    def __init__(self, model, cache, device: str):
        self.model, self.cache, self.device = model, cache, device

    def steps(self, row, tokens: int, static=None, full: bool = False):
        keys, question = row
        if full:
            ids, mask = left_pad([[t for k in keys for t in self.cache.token_ids[k]] + question], 0, self.device)
            return decode_steps(self.model, ids, mask, max_new_tokens=tokens, stop_ids=set(), pad_id=0, static=static)
        past, context_mask, _ = self.cache.assemble_rows([(self.cache, keys)], self.model)
        ids, mask = left_pad([question], 0, self.device)
        return decode_steps(self.model, ids, torch.cat([context_mask, mask], dim=1), max_new_tokens=tokens,
                            stop_ids=set(), pad_id=0, past=past, static=static)

    def first(self, row, tokens: int, **kw) -> None:
        steps = self.steps(row, tokens, **kw)
        int(next(steps)[0])  # the host has the token
        steps.close()

    def tokens(self, row, tokens: int, **kw) -> list[int]:
        return [int(token[0]) for token in self.steps(row, tokens, **kw)]

    def all(self, row, tokens: int, **kw) -> float:
        """Decode `tokens` tokens; returns the seconds from the host having the first token to having the last
        (the decode rate from one request, not the difference of two medians: a full prefill's spread on the CPU
        is as large as the decoding after it)."""
        steps = self.steps(row, tokens, **kw)
        int(next(steps)[0])
        start = time.perf_counter()
        out = list(steps)
        int(out[-1][0])
        return time.perf_counter() - start


def profile_rows(run, device: str, top: int = 15) -> list[dict]:
    """The most expensive operators of one run (torch.profiler), for finding where time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key.replace("cuda", "device"), 0) or
                  getattr(e, key, 0), reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "cpu_ms": e.cpu_time_total / 1000,
             "device_ms": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1000} for e in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged/HF model, or random:llama-8b / random:llama-1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--passage-tokens", type=int, default=256)
    p.add_argument("--pool", type=int, default=32, help="stored passages the requests draw from")
    p.add_argument("--head-tokens", type=int, default=40)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64,
                   help=f"tokens decoded for the batch-1 decode rows (eager rows: at most {EAGER_DECODE_TOKENS})")
    p.add_argument("--rank", type=int, default=16, help="the active LoRA adapter's rank (0: the bare model)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows (they need CUDA)")
    p.add_argument("--profile", action="store_true", help="also record the top operators of one eager cached TTFT, and of a compiled request")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"the rows to measure, comma-separated (full_eager, the baseline, always): {', '.join(ROWS)}")
    p.add_argument("--trace", type=Path,
                   help="also write a Chrome trace (torch.profiler) of one compiled cached first token: where the "
                        "host's time goes")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    wanted = {"full_eager", *args.rows.split(",")}
    if wanted - set(ROWS):
        p.error(f"unknown rows: {', '.join(sorted(wanted - set(ROWS)))}; known: {', '.join(ROWS)}")
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    torch.set_grad_enabled(False)

    rates = {"matmul_flop_s": matmul_rate(args.device, dtype, 8192 if cuda else 2048),
             "read_bytes_s": read_bandwidth(args.device, dtype, 4.0 if cuda else 1.0)}
    torch.cuda.empty_cache() if cuda else None
    base = load_model(args.model, args.device, dtype)
    model = with_adapters(base, 1, args.rank) if args.rank else base
    if args.rank:
        model.set_adapter("d0")
    config = base.config
    head, segments, rows = requests(args.requests + 2, config.vocab_size, head=args.head_tokens,
                                    passages=args.passages, passage_tokens=args.passage_tokens, pool=args.pool,
                                    question=args.question_tokens)
    start = time.perf_counter()
    cache = FrozenKVCache.from_segments(model, head, segments).attach(model)
    build_s = time.perf_counter() - start
    warm, rows = rows[:2], rows[2:]
    if cuda:  # the compiled assembly against the eager one, on one request's slots
        from retro_peft.kvcache import assembly

        slots = torch.cat([torch.arange(cache.spans[k][0], cache.spans[k][0] + cache.spans[k][1])
                           for k in rows[0][0]]).to(args.device)
        shift = torch.arange(len(slots), device=args.device) - 40
        fused = assembly.gathered(cache.keys, cache.values, slots, shift, cache.inv_freq, 1, len(slots))
        plain = assembly._gathered(cache.keys, cache.values, slots, shift, cache.inv_freq, 1, len(slots))
        assembly_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(fused, plain))
        print(f"compiled assembly vs eager: max abs difference {assembly_diff:.3g}")
    request = Request(model, cache, args.device)

    # bounds from the same run's rates
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = base.get_input_embeddings().weight
    weight_bytes = params - (0 if config.tie_word_embeddings else embedding.numel() * embedding.element_size())
    per_token_kv = cache.keys[:, :, :1].numel() * cache.keys.element_size() * 2  # keys and values, every layer
    context = args.head_tokens + args.passages * (args.passage_tokens + 3)
    prompt = context + args.question_tokens
    matmul_params = weight_bytes / embedding.element_size()
    attn = lambda q, k: 4 * config.num_hidden_layers * config.hidden_size * q * k  # noqa: E731 (QK^T and AV)
    full_flops = 2 * matmul_params * prompt + attn(prompt, prompt) / 2  # causal: half the pairs
    tail_flops = 2 * matmul_params * args.question_tokens + attn(args.question_tokens, prompt)
    bound_ms = lambda flops, nbytes: 1000 * max(flops / rates["matmul_flop_s"], nbytes / rates["read_bytes_s"])  # noqa: E731
    bounds = {"full_prefill_ms": bound_ms(full_flops, weight_bytes + per_token_kv * prompt),
              "cached_prefill_ms": bound_ms(tail_flops, weight_bytes + per_token_kv * prompt),
              "decode_token_ms": bound_ms(2 * matmul_params, weight_bytes + per_token_kv * (prompt + args.decode_tokens / 2))}

    out = {"model": args.model, "device": args.device, "dtype": str(dtype).replace("torch.", ""), **machine_info(),
           "adapter_rank": args.rank, "prompt_tokens": prompt, "question_tokens": args.question_tokens,
           "passages": args.passages, "passage_tokens": args.passage_tokens, "requests": len(rows),
           "rates": rates, "weight_bytes": weight_bytes, "bounds": bounds,
           "compiled_assembly_max_abs_diff": assembly_diff if cuda else None,
           "cache": {"build_s": build_s, "segments": len(segments), "stored_tokens": cache.keys.shape[2],
                     "bytes_per_token": per_token_kv}}
    ttft, decode_rate, first_run_s, agreement = {}, {}, {}, {}
    n = args.decode_tokens
    eager_tokens = min(n, EAGER_DECODE_TOKENS)

    def save() -> None:
        out.update(ttft_ms=ttft, decode_tok_s=decode_rate, first_run_s=first_run_s, tokens_as_eager=agreement)
        if args.out:  # after every row: a run cut short keeps what it measured
            write_json(args.out, out)

    def measure(label: str, n: int = n, **kw) -> None:
        if label not in wanted:
            return
        for row in warm:  # untimed: compiles and records the graphs of this shape
            start = time.perf_counter()
            request.first(row, n, **kw)
            request.all(row, n, **kw)
            first_run_s.setdefault(label, time.perf_counter() - start)
        ttft[label] = median_ms(lambda row: request.first(row, n, **kw), rows, args.device)
        decode_rate[label] = (n - 1) / statistics.median(request.all(row, n, **kw) for row in rows)
        if label == "cached_eager":
            agreement["reference"] = request.tokens(rows[0], eager_tokens)
        elif label.startswith("cached_compiled") and "reference" in agreement:
            got = request.tokens(rows[0], n, **kw)[:eager_tokens]  # n: the graphs' cache length, no new compile
            same = next((i for i, (a, b) in enumerate(zip(got, agreement["reference"])) if a != b), len(got))
            agreement[label] = {"first_equal": same > 0, "agreeing_prefix": same, "of": len(got)}
        if args.profile and label.startswith("cached_compiled"):  # the same shapes as measured: replays
            out[f"profile_{label}"] = profile_rows(lambda: request.all(rows[0], n, **kw), args.device, 30)
        print(f"{label}: first token {ttft[label]:.2f} ms, then {decode_rate[label]:.1f} tokens/s", flush=True)
        save()

    measure("full_eager", eager_tokens, full=True)
    measure("cached_eager", eager_tokens)
    out["assembly_ms"] = median_ms(lambda row: cache.assemble_rows([(cache, row[0])], model), rows, args.device)
    if args.profile:
        out["profile_cached_eager"] = profile_rows(lambda: request.first(rows[0], n), args.device)
        out["profile_full_eager"] = profile_rows(lambda: request.first(rows[0], n, full=True), args.device)
    if cuda and not args.no_compile:
        static = StaticDecode(model, sync_every=1)
        measure("cached_compiled_sync1", static=static)
        static.sync_every = SYNC_EVERY  # the default; the same graphs
        measure("cached_compiled", static=static)
        if args.profile and "cached_compiled" in wanted:  # the same shapes as measured: replays, no compile
            out["profile_cached_compiled_first"] = profile_rows(lambda: request.first(rows[0], n, static=static),
                                                                args.device, 30)
        if args.trace and "cached_compiled" in wanted:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for row in rows[:2]:
                    request.first(row, n, static=static)
                    sync(args.device)
            prof.export_chrome_trace(str(args.trace))
        if "cached_compiled_layerwise" in wanted:  # the same graphs; only the refill before them differs
            from unittest import mock

            with mock.patch("retro_peft.hf_compat._plain_static_layers", lambda cache: None):
                measure("cached_compiled_layerwise", static=static)
        for label, options in VARIANTS.items():
            if label in wanted:  # each its own graphs, dropped before the next
                options = dict(options)
                blas, default_blas = options.pop("blas", None), torch.backends.cuda.preferred_blas_library()
                try:
                    if blas:
                        torch.backends.cuda.preferred_blas_library(blas)
                    measure(label, static=StaticDecode(model, **options))
                finally:
                    torch.backends.cuda.preferred_blas_library(default_blas)
                torch.cuda.empty_cache()
        measure("full_compiled", static=static, full=True)  # the prompt is too long for a prefill graph: eager
    decode_bound = 1000 / bounds["decode_token_ms"]
    out["ratios"] = {"ttft_full_vs": {k: ttft["full_eager"] / v for k, v in ttft.items()},
                     "ttft_bound_speedup": bounds["full_prefill_ms"] / bounds["cached_prefill_ms"],
                     "ttft_of_bound": {k: (bounds["full_prefill_ms"] if k.startswith("full") else
                                           bounds["cached_prefill_ms"]) / v for k, v in ttft.items()},
                     "decode_of_bound": {k: v / decode_bound for k, v in decode_rate.items()}}

    print(f"\n{args.model} on {args.device} ({out['dtype']}): measured {rates['matmul_flop_s'] / 1e12:.1f} TFLOP/s "
          f"matmul, {rates['read_bytes_s'] / 1e12:.2f} TB/s read; prompt {prompt} tokens ({args.passages} stored "
          f"passages of {args.passage_tokens}, question {args.question_tokens}); cache built in {build_s:.1f} s, "
          f"{per_token_kv / 1024:.0f} KiB per stored token")
    print("| path | time to first token | vs full prefill | its bound | of bound | decode tokens/s | of bound |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, v in ttft.items():
        b = bounds["full_prefill_ms"] if k.startswith("full") else bounds["cached_prefill_ms"]
        print(f"| {k} | {v:.2f} ms | {ttft['full_eager'] / v:.2f}x | {b:.2f} ms | {b / v:.0%} | "
              f"{decode_rate[k]:.1f} | {decode_rate[k] / decode_bound:.0%} |")
    print(f"bound speed-up of the cache: {out['ratios']['ttft_bound_speedup']:.1f}x; decode bound "
          f"{decode_bound:.1f} tokens/s; assembly alone {out['assembly_ms']:.2f} ms")
    if args.out:
        write_json(args.out, out)
        plots.chart_beside(args.out, out, plots.generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
