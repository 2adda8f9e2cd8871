"""Benchmark `retro-peft serve`: cached throughput and uncached generation, batching on vs off.

    python benchmarks/serve.py            # SmolLM2 on this machine's CPU (or GPU: --device cuda)
    python benchmarks/serve.py --quick    # a tiny random Llama and fewer requests: a smoke run

The server runs in this process (uvicorn in a thread); the load comes from a
separate process (`--load`, asyncio + httpx), so the client does not steal the
server's event loop. Reports JSON:

  cached:    200 concurrent clients on one cached greedy request for 20 s, three rounds (wrk), the
             median round by p99 reported and every round listed: requests/s, p50, p99, non-2xx
             (load from wrk, `apt-get install wrk`, else from the Python client)
  uncached:  distinct questions at concurrency 1, 8, 32 (after a warm-up round), batching on
             (max_batch_size 32, --max-wait-ms) and off (1): generated tokens/s, p50, p99,
             statuses, mean batch size; and the on/off speed-up at each concurrency

  kv_cache:  (--kv-cache, only this section) RAG-sized prompts: the SQuAD benchmark index (173 paragraphs,
             k 3) and its articles 4-5 questions, one question per request, uncached, batching on, at
             concurrency 1 and 32: a domain answering through its frozen KV cache against the same index
             and model with full prefill (answers differ: BENCHMARKS.md, Frozen KV cache)

  compiled:  (--compiled, only this section, CUDA) the server decoding eagerly against `compile_decode`, batching
             on, distinct questions at concurrency 1, 8, 32: tokens/s, p50, p99, statuses (issue 20)

  mixed:     (--mixed, only this section) issue 20's mixed workload through both batching modes in one run:
             prompts of 100-700 tokens, max tokens 8-128 (seeded), streamed, arriving open-loop (Poisson) at
             each --rates: generated tokens/s, TTFT and end-to-end latency p50/p99, statuses

`--batching-mode passes|continuous` picks the server's batching for the other sections.

Goals (issue 5): cached >= 1000 req/s with p99 < 100 ms at 200 clients on 2 cores; at
concurrency 32 batching >= 4x the tokens/s of batching off; no 5xx anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plots
from common import RANDOM_CONFIGS, SQUAD, machine_info, print_json

DOCS = [
    {"id": "normans", "title": "Normans", "text": "The Normans gave their name to Normandy, a region in France."},
    {"id": "rhine", "title": "Rhine", "text": "The Rhine begins in the Swiss Alps and flows into the North Sea."},
    {"id": "oxygen", "title": "Oxygen", "text": "Oxygen has atomic number 8; Carl Wilhelm Scheele found it in 1773."},
    {"id": "piano", "title": "Piano", "text": "The piano was invented in Italy by Bartolomeo Cristofori around 1700."},
]
KEY = "sk-bench"


# -- the load generator (separate process) ----------------------------------------------------

async def _load(url: str, concurrency: int, total: int, body: dict, unique: bool, tag: str = "",
                prompts: list[str] | None = None) -> dict:
    """prompts: request i asks prompts[i] (else `body`'s prompt, made unique with a suffix when `unique`)."""
    import httpx

    latencies, statuses, tokens, prompt_tokens = [], {}, 0, 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        async def worker():
            nonlocal tokens, prompt_tokens
            for i in counter:
                payload = dict(body, prompt=f"{body['prompt']} ({tag}variant {i})") if unique else body
                if prompts:
                    payload = dict(body, prompt=prompts[i % len(prompts)])
                start = time.perf_counter()
                response = await client.post("/v1/completions", json=payload)
                latencies.append(time.perf_counter() - start)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    usage = response.json()["usage"]
                    tokens += usage["completion_tokens"]
                    prompt_tokens += usage["prompt_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)  # noqa: E731
    return {"concurrency": concurrency, "requests": total, "seconds": round(wall, 2),
            "requests_per_s": round(total / wall, 1), "tokens_per_s": round(tokens / wall, 1),
            "mean_prompt_tokens": round(prompt_tokens / max(total, 1), 1),
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "statuses": {str(k): v for k, v in sorted(statuses.items())}}


async def _open_loop(url: str, rate: float, bodies: list[dict], seed: int) -> dict:
    """Stream each body as a request, arrivals a Poisson process of `rate` per second (open loop: a slow server
    does not slow the arrivals): time to the first text, to the last byte, and the tokens generated."""
    import random

    import httpx

    rng = random.Random(seed)
    done = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(bodies)),
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        async def one(delay: float, body: dict) -> None:
            await asyncio.sleep(delay)
            start, first, tokens, failed = time.perf_counter(), None, 0, False
            payload = dict(body, stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/completions", json=payload) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    data = json.loads(line[6:])
                    failed = failed or "error" in data  # a stream's timeout comes as an event after its 200
                    if first is None and data.get("choices") and data["choices"][0].get("text"):
                        first = time.perf_counter() - start
                    if data.get("usage"):
                        tokens = data["usage"]["completion_tokens"]
            done.append((response.status_code, first, time.perf_counter() - start, tokens, failed))

        arrivals, at = [], 0.0
        for _ in bodies:
            arrivals.append(at)
            at += rng.expovariate(rate)
        start = time.perf_counter()
        await asyncio.gather(*(one(t, b) for t, b in zip(arrivals, bodies)))
        wall = time.perf_counter() - start

    def pick(values: list[float], q: float):
        values = sorted(v for v in values if v is not None)
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1) if values else None

    ttft, latency = [d[1] for d in done], [d[2] for d in done]
    statuses: dict = {}
    for d in done:
        statuses[str(d[0])] = statuses.get(str(d[0]), 0) + 1
    return {"rate_per_s": rate, "requests": len(bodies), "seconds": round(wall, 2),
            "tokens_per_s": round(sum(d[3] for d in done) / wall, 1),
            "ttft_p50_ms": pick(ttft, 0.5), "ttft_p99_ms": pick(ttft, 0.99),
            "latency_p50_ms": pick(latency, 0.5), "latency_p99_ms": pick(latency, 0.99), "statuses": statuses,
            "failed_streams": sum(d[4] for d in done)}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_KEY")
statuses = {}
response = function(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
"""


def run_wrk(url: str, concurrency: int, seconds: int, body: dict) -> dict:
    """Cached load through wrk (C, one thread): a Python client would need more CPU than the server it measures."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    env = dict(os.environ, WRK_BODY=json.dumps(body), WRK_KEY=KEY)
    proc = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", f.name,
                           f"{url}/v1/completions"], capture_output=True, text=True, check=True, env=env)
    os.unlink(f.name)
    out = proc.stdout

    def ms(label: str) -> float:
        value = next(line.split()[1] for line in out.splitlines() if line.strip().startswith(label))
        for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1000.0)):
            if value.endswith(unit):
                return round(float(value[: -len(unit)]) * scale, 1)
        raise ValueError(value)

    requests = int(next(line.split()[0] for line in out.splitlines() if "requests in" in line))
    non_2xx = next((int(line.split(":")[1]) for line in out.splitlines() if "Non-2xx" in line), 0)
    errors = next((line.strip() for line in out.splitlines() if "Socket errors" in line), None)
    return {"load": "wrk", "concurrency": concurrency, "requests": requests, "seconds": seconds,
            "requests_per_s": round(requests / seconds, 1), "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "non_2xx": non_2xx, "socket_errors": errors}


def run_load(url: str, concurrency: int, total: int, body: dict, unique: bool, tag: str = "",
             prompts: list[str] | None = None) -> dict:
    """Run the load in a new process and return its report."""
    return _in_process({"url": url, "concurrency": concurrency, "total": total, "body": body, "unique": unique,
                        "tag": tag, "prompts": prompts})


def _in_process(spec: dict) -> dict:
    """The load generator's report, run in a new process (spec["open_loop"]: `_open_loop`, else `_load`)."""
    proc = subprocess.run([sys.executable, __file__, "--load", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


# -- the server -------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True)


def random_model(root: Path, shape: dict, tokenizer_path: str | None) -> str:
    """A random-weight Llama of `shape` with SmolLM2's tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from retro_peft.models import resolve_generator

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_generator("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": len(tokenizer), **shape}, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    # built on the GPU when there is one: an 8B shape's random init takes minutes on the CPU, seconds there
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    del model
    tokenizer.save_pretrained(root / "model")
    return str(root / "model")


def bank_model(root: Path, args) -> str:
    if args.quick:
        model = random_model(root, TINY, args.tokenizer)
    elif args.model.startswith("random:"):
        model = random_model(root, RANDOM_CONFIGS[args.model.split(":", 1)[1]], args.tokenizer)
    else:
        model = args.model
    return model


def build_bank(root: Path, args, model: str | None = None, compile_decode: bool = False):
    from retro_peft.domains.bank import AdapterBank
    from retro_peft.index import IndexConfig, build_index

    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    index = build_index(root / "index", [corpus], IndexConfig(encoder=args.encoder, chunk_tokens=64, overlap=8))
    bank = AdapterBank(model or bank_model(root, args), device=args.device, dtype=args.dtype,
                       compile_decode=compile_decode)
    bank.load("docs", index.path)
    return bank


def compiled_section(root: Path, args) -> dict:
    """The same server decoding eagerly and with `compile_decode` (CUDA graphs), batching on, distinct questions
    at concurrency 1, 8 and 32; two warm-up rounds first at each concurrency (they hold the compiles)."""
    from retro_peft.serving.app import create_app
    from retro_peft.serving.testing import serve_in_thread

    model = bank_model(root, args)
    body = {"model": "docs", "prompt": "Who invented the piano?", "max_tokens": args.max_tokens, "temperature": 0}
    out = {"rows": [{"concurrency": c} for c in (1, 8, 32)]}
    for label, compiled in (("eager", False), ("compiled", True)):
        (root / label).mkdir()
        bank = build_bank(root / label, args, model=model, compile_decode=compiled)
        app = create_app(server_settings(32, cache=False, max_wait_ms=args.max_wait_ms), bank)
        with serve_in_thread(app) as url:
            for row in out["rows"]:
                c = row["concurrency"]
                start = time.perf_counter()
                for round_ in range(2):
                    run_load(url, c, 2 * c, body, unique=True, tag=f"warm-up {round_} {label} ")
                warm_up_s = round(time.perf_counter() - start, 1)
                row[label] = dict(run_load(url, c, max(4 * c, 16), body, unique=True, tag=f"{label} "),
                                  warm_up_s=warm_up_s)
                print(json.dumps({label: row[label]}), file=sys.stderr)
        del bank, app
    for row in out["rows"]:
        row["compiled_vs_eager_tokens_per_s"] = round(row["compiled"]["tokens_per_s"] /
                                                      max(row["eager"]["tokens_per_s"], 1e-9), 2)
    return out


def kv_cache_section(root: Path, args) -> dict:
    """Full prefill against the frozen KV cache, same index, model and questions, through the real server."""
    from retro_peft.domains.bank import AdapterBank
    from retro_peft.index import IndexConfig, build_index
    from retro_peft.qa import load_qa
    from retro_peft.serving.app import create_app
    from retro_peft.serving.testing import serve_in_thread

    index = build_index(root / "squad", [SQUAD], IndexConfig(encoder="minilm"))
    questions = list(dict.fromkeys(q.question for q in load_qa(SQUAD, articles=slice(3, 5))))
    bank = AdapterBank(bank_model(root, args), device=args.device)
    bank.load("full-prefill", index.path)
    start = time.perf_counter()
    bank.load("frozen-kv", index.path, kv_cache=root / "squad.kv")  # computes every chunk's states once
    out = {"index_chunks": len(index.chunk_ids()), "kv_build_s": round(time.perf_counter() - start, 1), "rows": []}
    for concurrency in (1, 32):
        total = 2 * concurrency if args.quick else max(4 * concurrency, 16)
        row = {"concurrency": concurrency}
        for domain in ("full-prefill", "frozen-kv"):
            body = {"model": domain, "prompt": "", "max_tokens": args.max_tokens, "temperature": 0}
            app = create_app(server_settings(32, cache=False, max_wait_ms=args.max_wait_ms, mode=args.batching_mode), bank)
            with serve_in_thread(app) as url:
                run_load(url, concurrency, concurrency, body, unique=False, prompts=questions[-concurrency:])  # warm-up
                row[domain] = run_load(url, concurrency, total, body, unique=False, prompts=questions[:total])
        row["kv_vs_full_tokens_per_s"] = round(row["frozen-kv"]["tokens_per_s"] /
                                               max(row["full-prefill"]["tokens_per_s"], 1e-9), 2)
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
    one, many = out["rows"]
    out["batched_32_vs_one_at_a_time"] = {d: round(many[d]["tokens_per_s"] / max(one[d]["tokens_per_s"], 1e-9), 2)
                                          for d in ("full-prefill", "frozen-kv")}
    return out


def server_settings(max_batch_size: int, cache: bool, max_wait_ms: float = 50, mode: str = "passes"):
    from retro_peft.serving.settings import ServeSettings

    return ServeSettings(auth={"keys": [{"name": "bench", "key": KEY, "scopes": ["generate"]}]},
                         limits={"enabled": False}, cache={"enabled": cache}, log_level="warning",
                         generation={"max_tokens_limit": 512, "max_prompt_tokens": 2048},
                         batching={"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "max_queue": 1024,
                                   "mode": mode})


MIXED_PROMPT_TOKENS = (100, 700)
MIXED_MAX_TOKENS = (8, 128)


def mixed_bodies(tokenizer, requests: int, seed: int) -> list[dict]:
    """Issue 20's mixed workload: distinct prompts of 100-700 tokens (the corpus repeated, each from its own
    offset, ending in a question), max tokens 8-128, greedy."""
    import random

    rng = random.Random(seed)
    filler = tokenizer.encode(" ".join(d["text"] for d in DOCS) * 60, add_special_tokens=False)
    bodies = []
    for i in range(requests):
        length = rng.randint(*MIXED_PROMPT_TOKENS)
        text = tokenizer.decode(filler[i:i + length]) + f" Question {i}: who invented the piano?"
        bodies.append({"model": "docs", "prompt": text, "max_tokens": rng.randint(*MIXED_MAX_TOKENS),
                       "temperature": 0})
    return bodies


def mixed_section(root: Path, args) -> dict:
    """Both batching modes, the same requests and arrival times, one server each at a time, through the real
    server."""
    from retro_peft.serving.app import create_app
    from retro_peft.serving.testing import serve_in_thread

    bank = build_bank(root, args, compile_decode=args.compile_decode)
    bodies = mixed_bodies(bank.tokenizer, args.requests, seed=0)
    out = {"requests": args.requests, "prompt_tokens": list(MIXED_PROMPT_TOKENS),
           "max_tokens": list(MIXED_MAX_TOKENS), "rows": []}
    for rate in args.rates:
        row = {"rate_per_s": rate}
        for mode in ("passes", "continuous"):
            app = create_app(server_settings(32, cache=False, max_wait_ms=args.max_wait_ms, mode=mode), bank)
            with serve_in_thread(app) as url:
                warm = [dict(b, max_tokens=4) for b in bodies[:2]]
                _in_process({"open_loop": {"url": url, "rate": 100.0, "bodies": warm, "seed": 1}})
                row[mode] = _in_process({"open_loop": {"url": url, "rate": rate, "bodies": bodies, "seed": 0}})
        row["continuous_vs_passes_tokens_per_s"] = round(
            row["continuous"]["tokens_per_s"] / max(row["passes"]["tokens_per_s"], 1e-9), 2)
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
    return out


def batch_sizes(app) -> tuple[float, float]:
    """(passes, rows) decoded so far, from the server's batch-size histogram."""
    samples = {x.name: x.value for m in app.state.server.metrics.batch_size.collect() for x in m.samples}
    return samples.get("retro_peft_batch_size_count", 0), samples.get("retro_peft_batch_size_sum", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, fewer requests")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--model", default="smollm2-135m", help="packaged/HF model, or random:llama-1b (GPU runs)")
    parser.add_argument("--tokenizer", help="tokenizer folder for random models (default: the packaged SmolLM2's)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=50, help="batching: how long a batch waits (server default 50)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", help="the bank's dtype (the serve setting): float32 (CPU default) or bfloat16")
    parser.add_argument("--compile-decode", action="store_true",
                        help="--mixed: both modes with compile_decode (CUDA graphs; continuous mode in its slot cache)")
    parser.add_argument("--kv-cache", action="store_true",
                        help="run only the frozen KV cache section (RAG-sized prompts from the SQuAD data)")
    parser.add_argument("--batching-mode", choices=("passes", "continuous"), default="passes",
                        help="the server's batching for the cached, uncached and kv-cache sections")
    parser.add_argument("--compiled", action="store_true",
                        help="run only the compiled-decoding section: eager against compile_decode (CUDA, issue 20)")
    parser.add_argument("--encoder", default="minilm",
                        help="the index's encoder (a folder: e.g. a small random one where no weights exist)")
    parser.add_argument("--mixed", action="store_true",
                        help="run only the mixed-workload section, both batching modes (issue 20)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0],
                        help="--mixed: arrival rates, requests per second")
    parser.add_argument("--requests", type=int, default=24, help="--mixed: requests per rate and mode")
    parser.add_argument("--out", help="also write the JSON report here")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: run as the load generator
    args = parser.parse_args()
    if args.load:
        spec = json.loads(args.load)
        print(json.dumps(asyncio.run(_open_loop(**spec["open_loop"]) if "open_loop" in spec else _load(**spec))))
        return

    import logging

    import torch

    from retro_peft.serving.app import create_app
    from retro_peft.serving.testing import serve_in_thread

    logging.getLogger("retro_peft").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = {"model": "tiny-random-llama" if args.quick else args.model, "device": args.device or "cpu",
              "cpus": machine_info()["cores"], "max_tokens": args.max_tokens, "max_wait_ms": args.max_wait_ms,
              "batching_mode": args.batching_mode, "dtype": args.dtype, "compile_decode": args.compile_decode}
    body = {"model": "docs", "prompt": "Who invented the piano?", "max_tokens": args.max_tokens, "temperature": 0}
    with tempfile.TemporaryDirectory() as tmp:
        if args.mixed:
            report["mixed"] = mixed_section(Path(tmp), args)
            return print_json(report, args.out)
        if args.compiled:
            report["compiled"] = compiled_section(Path(tmp), args)
            return print_json(report, args.out)
        if args.kv_cache:
            report["kv_cache"] = kv_cache_section(Path(tmp), args)
            print_json(report, args.out)
            if args.out:
                plots.chart_beside(args.out, report, plots.serving)
            return None
        bank = build_bank(Path(tmp), args)

        with serve_in_thread(create_app(server_settings(32, cache=True, mode=args.batching_mode), bank)) as url:
            run_load(url, 1, 1, body, unique=False)  # fill the cache
            if shutil.which("wrk"):
                # Three rounds, the median one reported (by p99): on a 2-core machine shared with the
                # load generator the tail moves by ~15% from one round to the next.
                rounds = [run_wrk(url, 200, 5 if args.quick else 20, body) for _ in range(1 if args.quick else 3)]
                report["cached"] = dict(sorted(rounds, key=lambda r: r["p99_ms"])[len(rounds) // 2],
                                        rounds=[{k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "non_2xx",
                                                                   "socket_errors")} for r in rounds])
            else:  # `apt-get install wrk`; the Python client measures itself as much as the server
                report["cached"] = dict(run_load(url, 200, 2000 if args.quick else 20000, body, unique=False),
                                        load="httpx")
            print(json.dumps({"cached": report["cached"]}), file=sys.stderr)

        report["uncached"] = []
        for concurrency in (1, 8, 32):
            row = {"concurrency": concurrency}
            for label, max_batch in (("batching_on", 32), ("batching_off", 1)):
                total = 2 * concurrency if args.quick else max(4 * concurrency, 16)
                app = create_app(server_settings(max_batch, cache=False, max_wait_ms=args.max_wait_ms,
                                                 mode=args.batching_mode), bank)
                with serve_in_thread(app) as url:
                    # Warm-up, not measured: the first passes at a new batch shape are slow on a GPU.
                    run_load(url, concurrency, concurrency, body, unique=True, tag=f"warm-up {label} ")
                    passes, rows = batch_sizes(app)
                    row[label] = run_load(url, concurrency, total, body, unique=True, tag=f"{label} ")
                    passes, rows = (after - before for after, before in zip(batch_sizes(app), (passes, rows)))
                    row[label]["mean_batch_size"] = round(rows / passes, 2) if passes else None
            row["speedup"] = round(row["batching_on"]["tokens_per_s"] / max(row["batching_off"]["tokens_per_s"], 1e-9), 2)
            report["uncached"].append(row)
            print(json.dumps(row), file=sys.stderr)
    print_json(report, args.out)
    if args.out:
        plots.chart_beside(args.out, report, plots.serving)


if __name__ == "__main__":
    main()
