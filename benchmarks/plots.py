"""Charts of the benchmark results: a PNG next to each JSON in benchmarks/results/, with the same stem.

    python benchmarks/plots.py              # every chart, from the JSON files in benchmarks/results/
    python benchmarks/plots.py FILE.json..  # the charts of these files

One function per chart kind (`quality`, `generation`, `serving`, `retrieval`, `training`), each taking a
results dict as its benchmark writes it and the PNG's path; each benchmark calls its own through
`chart_beside` right after writing its JSON. Headless (matplotlib's Agg backend), small PNGs (dpi 100).
A file without the fields its chart needs raises `ChartError` naming what is missing; `main` prints that
and goes on with the next file.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DPI = 100  # a few tens of KB per chart: the PNGs are committed
WIDTH = 7.0  # inches: 700 px, one screen column of BENCHMARKS.md


class ChartError(ValueError):
    """A results file that is not JSON, or lacks the fields its chart needs."""


# -- drawing -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _figure(panels: int, height: float = 3.4):
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(WIDTH, height), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, png: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=DPI, bbox_inches="tight")  # "tight": legends placed outside the axes stay in
    plt.close(fig)
    return png


def _title(data: dict, what: str) -> str:
    where = ", ".join(str(data[k]) for k in ("model", "device") if isinstance(data.get(k), str))
    return f"{what} ({where})" if where else what


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- quality per variant -------------------------------------------------------------------------

# The score of each answer kind: span F1, free-form token F1, choice accuracy (whichever the variant has).
SCORES = (("f1", "F1"), ("token_f1", "token F1"), ("accuracy", "accuracy"))
RATES = (("abstain_unanswerable", "abstains on unanswerable"), ("answer_answerable", "answers answerable"))


def _variants(data: dict) -> dict[str, dict]:
    """{label: scores} of quality.json (variants), answer-kinds.json (tasks -> variants, baselines) or a demo
    report (scores per setup)."""
    if isinstance(data.get("variants"), dict):
        return data["variants"]
    if isinstance(data.get("tasks"), dict):
        out = {}
        several = len(data["tasks"]) > 1
        for task, body in data["tasks"].items():
            rows = {**(body.get("variants") or {}), **{f"baseline: {k}": v for k, v in (body.get("baselines") or {}).items()}}
            out.update({f"{task}: {k}" if several else k: v for k, v in rows.items()})
        return out
    if isinstance(data.get("scores"), dict):
        return data["scores"]
    return {}


def quality(data: dict, png: Path) -> Path:
    """Per variant: its answer score (F1 / token F1 / accuracy), abstention on unanswerable questions and the
    share of answerable questions answered (horizontal bars, in %)."""
    rows = {}
    for name, scores in _variants(data).items():
        if not isinstance(scores, dict):
            continue
        score = next(((label, scores[key]) for key, label in SCORES if _number(scores.get(key))), None)
        rates = [(label, scores[key]) for key, label in RATES if _number(scores.get(key))]
        if score or rates:
            rows[name] = ([score] if score else []) + rates
    if not rows:
        raise ChartError("no variant with f1/token_f1/accuracy or abstain_unanswerable/answer_answerable "
                         "(expected under variants, tasks.*.variants or scores)")
    labels = [label for _, label in SCORES if any(label == m for ms in rows.values() for m, _ in ms)]
    labels += [label for _, label in RATES]
    plt, fig, (ax,) = _figure(1, height=1.2 + 0.42 * len(rows) * (1 + 0.15 * len(labels)))
    names = list(rows)[::-1]  # the first variant on top
    bar = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ys = [y + (len(labels) / 2 - i - 0.5) * bar for y in range(len(names))]
        values = [dict(rows[n]).get(label) for n in names]
        ax.barh([y for y, v in zip(ys, values) if v is not None], [100 * v for v in values if v is not None],
                height=bar, label=label)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(labels), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    n = data.get("n_eval") or next((s.get("n") for s in _variants(data).values() if isinstance(s, dict)), None)
    return _save(plt, fig, png, _title(data, f"answer quality per variant{f', {n} questions' if n else ''}"))


def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# -- generation: tokens/s against batch size, time to first token per layout ------------------------------


def _batch_series(data: dict) -> list[tuple[str, dict[int, float], float | None]]:
    """(name, {batch size: tokens/s}, one-at-a-time tokens/s or None) of every `*batched_tok_s` mapping, at the
    top level and under kv_cache (its `full_`, `kv_`, `prefix_` layouts), plus compiled decoding's."""
    series = []
    for scope, prefix in ((data, ""), (data.get("kv_cache") or {}, "")):
        for key, value in scope.items():
            match = re.fullmatch(r"(?:(\w+)_)?batched_tok_s", key)
            if match and isinstance(value, dict):
                name = match.group(1) or "batched"
                baseline = scope.get(f"{match.group(1)}_one_at_a_time_tok_s" if match.group(1) else "one_at_a_time_tok_s")
                series.append((prefix + name, _by_batch(value), baseline if _number(baseline) else None))
        compiled = (scope.get("compiled_decode") or {}).get("tok_s")
        if isinstance(compiled, dict):
            nested = all(isinstance(v, dict) for v in compiled.values())
            for name, values in (compiled.items() if nested else [("", compiled)]):
                series.append((f"compiled {name}".strip(), _by_batch(values), None))
    return [(n, v, b) for n, v, b in series if v]


def _by_batch(values: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in values.items() if str(k).isdigit() and _number(v)}


def _ttft(data: dict) -> tuple[dict[str, float], dict[str, float]]:
    """({layout: measured ms}, {layout: its bound in ms}): generation.py's kv_cache.ttft_ms (and any kv_cache
    field naming a bound with the same layouts), or kv_bound.py's ttft_ms with its physical bounds (a full_*
    path against bounds.full_prefill_ms, a cached one against bounds.cached_prefill_ms)."""
    kv = data.get("kv_cache") or {}
    scope = kv if isinstance(kv.get("ttft_ms"), dict) else data
    measured = {k: float(v) for k, v in (scope.get("ttft_ms") or {}).items() if _number(v)}
    bound = {}
    for key, value in kv.items():
        if "bound" in key and isinstance(value, dict):
            bound.update({k: float(v) for k, v in value.items() if k in measured and _number(v)})
    physical = data.get("bounds") or {}
    for layout in measured:
        value = physical.get("full_prefill_ms" if layout.startswith("full") else "cached_prefill_ms")
        if _number(value):
            bound[layout] = float(value)
    return measured, bound


def generation(data: dict, png: Path) -> Path:
    """Decode throughput (tokens/s) against batch size, each curve with its one-at-a-time baseline (dashed);
    and, where measured, time to first token per layout of the frozen KV cache against its bound."""
    series = _batch_series(data)
    measured, bound = _ttft(data)
    if not series and not measured:
        raise ChartError("no batched_tok_s (top level or kv_cache) and no ttft_ms (top level or kv_cache)")
    plt, fig, axes = _figure(int(bool(series)) + int(bool(measured)))
    if series:
        ax = axes[0]
        for i, (name, values, baseline) in enumerate(series):
            color = f"C{i}"
            sizes = sorted(values)
            ax.plot(sizes, [values[b] for b in sizes], marker="o", color=color, label=name)
            if baseline is not None:
                ax.axhline(baseline, color=color, linestyle="--", linewidth=1,
                           label=f"{name}: one at a time")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({b for _, v, _ in series for b in v}), [str(b) for b in sorted({b for _, v, _ in series for b in v})])
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if measured:
        ax = axes[-1]
        layouts = list(measured)
        ax.bar(layouts, [measured[k] for k in layouts], color="C0", label="measured")
        if bound:
            ax.scatter([k for k in layouts if k in bound], [bound[k] for k in layouts if k in bound], marker="_",
                       s=600, color="black", zorder=3, label="bound")
        full = next((measured[k] for k in ("full", "full_eager") if k in measured), None)
        if full is not None:
            ax.axhline(full, color="grey", linestyle="--", linewidth=1, label="full prefill")
        ax.set_ylabel("time to first token (ms)")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    prompt = f"{data['prompt_tokens']}-token prompts" if _number(data.get("prompt_tokens")) else ""
    return _save(plt, fig, png, _title(data, f"generation{', ' + prompt if prompt else ''}"))


# -- serving: throughput and latency against concurrency ---------------------------------------------


def _serve_rows(data: dict) -> list[dict]:
    rows = data.get("uncached")
    if not isinstance(rows, list):  # the --kv-cache or --compiled section
        rows = (data.get("kv_cache") or data.get("compiled") or {}).get("rows")
    return [r for r in rows or [] if isinstance(r, dict) and _number(r.get("concurrency"))]


def serving(data: dict, png: Path) -> Path:
    """Uncached requests: tokens/s and latency (p50 solid, p99 dashed) against the number of concurrent
    clients, one curve per setting (batching on/off, full prefill/frozen KV cache, eager/compiled decoding)."""
    rows = _serve_rows(data)
    runs: dict[str, dict[int, dict]] = {}
    for row in rows:
        for name, run in row.items():
            if isinstance(run, dict) and _number(run.get("tokens_per_s")):
                runs.setdefault(name, {})[int(row["concurrency"])] = run
    if not runs:
        raise ChartError("no uncached (or kv_cache.rows, compiled.rows) list of {concurrency, <setting>: {tokens_per_s, p50_ms}}")
    plt, fig, (left, right) = _figure(2)
    for i, (name, by_c) in enumerate(runs.items()):
        cs = sorted(by_c)
        color = f"C{i}"
        left.plot(cs, [by_c[c]["tokens_per_s"] for c in cs], marker="o", color=color, label=name.replace("_", " "))
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            points = [(c, by_c[c][key] / 1000) for c in cs if _number(by_c[c].get(key))]
            if points:
                right.plot(*zip(*points), marker="o", linestyle=style, color=color,
                           label=f"{name.replace('_', ' ')} {key[:3]}")
    for ax, label in ((left, "tokens/s"), (right, "latency (s)")):
        ax.set_xscale("log", base=2)
        cs = sorted({c for by_c in runs.values() for c in by_c})
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cached = data.get("cached") or {}
    note = f"; cached: {cached['requests_per_s']:,.0f} req/s" if _number(cached.get("requests_per_s")) else ""
    return _save(plt, fig, png, _title(data, f"serving, uncached requests{note}"))


# -- retrieval: nDCG@10 per mode -------------------------------------------------------------------------


METRIC = "ndcg@10"


def _retrieval_setups(data: dict) -> dict[str, dict[str, float]]:
    """{setup: {mode: nDCG@10}}: retriever.json's encoders (packaged, contextual, trained, lsr.scores, ...) or
    retrieval.json's data sets (quality.<set>.<mode>)."""
    candidates = dict(data)
    candidates.update({k: v for k, v in (data.get("quality") or {}).items()} if isinstance(data.get("quality"), dict) else {})
    for name, value in data.items():
        if isinstance(value, dict) and isinstance(value.get("scores"), dict):
            candidates[name] = value["scores"]
    setups = {}
    for name, value in candidates.items():
        if isinstance(value, dict) and name != "delta":  # delta: trained - packaged, not a setup
            modes = {m: float(s[METRIC]) for m, s in value.items() if isinstance(s, dict) and _number(s.get(METRIC))}
            if modes:
                setups[name] = modes
    return setups


def retrieval(data: dict, png: Path) -> Path:
    """nDCG@10 per search mode (dense, sparse, hybrid, ...), one bar per encoder or data set."""
    setups = _retrieval_setups(data)
    if not setups:
        raise ChartError(f"no {{mode: {{{METRIC}: ...}}}} mapping (expected packaged/trained/... or quality.<set>)")
    modes = list(dict.fromkeys(m for s in setups.values() for m in s))
    plt, fig, (ax,) = _figure(1)
    width = 0.8 / len(setups)
    for i, (name, scores) in enumerate(setups.items()):
        xs = [x + (i - len(setups) / 2 + 0.5) * width for x, m in enumerate(modes) if m in scores]
        ax.bar(xs, [scores[m] for m in modes if m in scores], width=width, label=name.replace("_", " "))
    ax.set_xticks(range(len(modes)), modes, fontsize=8)
    low = min(v for s in setups.values() for v in s.values())
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel(METRIC)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    task = (data.get("data") or {}).get("task") if isinstance(data.get("data"), dict) else None
    return _save(plt, fig, png, f"retrieval {METRIC} per mode{f' ({task})' if task else ''}")


# -- training throughput ---------------------------------------------------------------------------------


def training(data: dict, png: Path) -> Path:
    """Training tokens/s per trainer variant (transformers.Trainer, ours, compiled)."""
    variants = {k: v["tokens_per_s"] for k, v in (data.get("variants") or {}).items()
                if isinstance(v, dict) and _number(v.get("tokens_per_s"))}
    if not variants:
        raise ChartError("no variants.<name>.tokens_per_s")
    plt, fig, (ax,) = _figure(1, height=2.8)
    ax.bar(list(variants), list(variants.values()), color=[f"C{i}" for i in range(len(variants))])
    base = variants.get("hf")
    for x, value in enumerate(variants.values()):
        ax.annotate(f"{value / base:.2f}x" if base else f"{value:,.0f}", (x, value), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("training tokens/s")
    ax.grid(axis="y", alpha=0.3)
    batch = f", batch {data['batch_size']}" if _number(data.get("batch_size")) else ""
    return _save(plt, fig, png, _title(data, f"training throughput{batch}"))


# -- which chart a results file gets ------------------------------------------------------------------------

# By file name, first match: the benchmark that writes it (quality.py, answer_kinds.py, generation.py, ...).
KINDS: list[tuple[str, Callable[[dict, Path], Path]]] = [
    (r"quality|answer-kinds|demo", quality),
    (r"gen-|kv-bound", generation),
    (r"serve-", serving),
    (r"retriev", retrieval),
    (r"tp-|throughput", training),
]


def chart_for(path: Path) -> Callable[[dict, Path], Path] | None:
    return next((chart for pattern, chart in KINDS if re.match(pattern, Path(path).name)), None)


def read_results(path: Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChartError(f"{path.name} is not a readable JSON results file ({e})") from None
    if not isinstance(data, dict):
        raise ChartError(f"{path.name} holds a JSON {type(data).__name__}, not a results object")
    return data


def plot_file(path: Path, chart: Callable[[dict, Path], Path] | None = None) -> Path:
    """The chart of the results file `path`, as `path` with .png (its kind from the name unless given)."""
    path = Path(path)
    chart = chart or chart_for(path)
    if chart is None:
        raise ChartError(f"{path.name}: no chart kind for this benchmark's results")
    data = read_results(path)
    try:
        return chart(data, path.with_suffix(".png"))
    except ChartError as e:
        raise ChartError(f"{path.name}: {e}") from None


def chart_beside(json_path, data: dict, chart: Callable[[dict, Path], Path]) -> Path | None:
    """What a benchmark calls right after writing `json_path`: its chart, as the PNG of the same stem. A chart
    that cannot be drawn (fields missing, no matplotlib) is reported, never fails the measured run."""
    try:
        png = chart(data, Path(json_path).with_suffix(".png"))
    except ChartError as e:
        print(f"no chart for {json_path}: {e}", file=sys.stderr)
        return None
    except ImportError:
        print(f"no chart for {json_path}: matplotlib is not installed (pip install -e '.[dev]'); "
              "`python benchmarks/plots.py` draws it later", file=sys.stderr)
        return None
    print(f"chart written to {png}", file=sys.stderr)
    return png


def main(argv: list[str] | None = None) -> int:
    """Chart every file given (default: every JSON in benchmarks/results/); one printed reason per file skipped."""
    files = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or sorted(RESULTS.glob("*.json"))
    for path in files:
        try:
            print(plot_file(path))
        except ChartError as e:
            print(f"skipped {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
