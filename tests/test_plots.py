"""benchmarks/plots.py: each chart kind drawn from a real results file of benchmarks/results/ (a valid, small PNG),
and a clear error for a file that is not JSON or lacks its chart's fields."""

import json
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is a dev dependency (pip install -e '.[dev]')")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules (`import common`)

import plots  # noqa: E402

RESULTS = BENCHMARKS / "results"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("chart, results", [
    (plots.quality, "quality-gpu-bcd-P0.8.json"),
    (plots.quality, "answer-kinds-gpu-topic.json"),  # tasks -> variants and baselines, choice accuracy
    (plots.quality, "demo-cpu.json"),  # scores per setup
    (plots.generation, "gen-cpu-smollm2.json"),  # tokens/s against batch size, one-at-a-time baseline
    (plots.generation, "gen-gpu-llama1b-kvcache.json"),  # and time to first token per layout
    (plots.serving, "serve-cpu-smollm2.json"),  # batching on/off against concurrency
    (plots.serving, "serve-cpu-smollm2-kvcache.json"),  # full prefill / frozen KV cache rows
    (plots.retrieval, "retriever-wiki-gpu.json"),
    (plots.training, "tp-smollm2-135m.json"),
])
def test_each_chart_kind_draws_a_small_png_from_a_real_results_file(chart, results, tmp_path):
    png = chart(plots.read_results(RESULTS / results), tmp_path / "chart.png")
    assert png == tmp_path / "chart.png"
    width, height = png_size(png)
    assert 400 <= width <= 1000 and 150 <= height <= 1200, (width, height)
    assert 5_000 < png.stat().st_size < 100_000  # drawn (not blank), and small enough to commit


def test_time_to_first_token_is_drawn_against_its_physical_bound(tmp_path):
    """benchmarks/kv_bound.py's shape: ttft_ms per path, bounds of a full and of a cached prefill."""
    data = {"model": "random:llama-1b", "device": "cuda", "prompt_tokens": 2120,
            "bounds": {"full_prefill_ms": 9.1, "cached_prefill_ms": 0.6, "decode_token_ms": 0.5},
            "ttft_ms": {"full_eager": 31.0, "cached_eager": 12.5, "cached_compiled": 2.4}}
    measured, bound = plots._ttft(data)
    assert bound == {"full_eager": 9.1, "cached_eager": 0.6, "cached_compiled": 0.6} and measured["full_eager"] == 31.0
    png_size(plots.generation(data, tmp_path / "kv-bound.png"))
    assert plots.chart_for(Path("kv-bound-gpu-1b.json")) is plots.generation


def test_plot_file_picks_the_kind_by_name_and_writes_the_png_beside_the_json(tmp_path):
    copy = tmp_path / "serve-cpu-smollm2.json"
    copy.write_text((RESULTS / "serve-cpu-smollm2.json").read_text())
    assert plots.plot_file(copy) == tmp_path / "serve-cpu-smollm2.png"
    png_size(tmp_path / "serve-cpu-smollm2.png")
    assert plots.chart_for(Path("retrieval.json")) is plots.retrieval
    assert plots.chart_for(Path("quality.json")) is plots.quality and plots.chart_for(Path("x.json")) is None


def test_a_malformed_or_incomplete_results_file_is_a_clear_error(tmp_path, capsys):
    broken = tmp_path / "quality-broken.json"
    broken.write_text('{"variants": {"a": ')
    with pytest.raises(plots.ChartError, match=r"quality-broken.json is not a readable JSON results file"):
        plots.plot_file(broken)
    listed = tmp_path / "gen-list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(plots.ChartError, match="holds a JSON list, not a results object"):
        plots.plot_file(listed)
    empty = tmp_path / "serve-empty.json"
    empty.write_text(json.dumps({"model": "m", "uncached": []}))
    with pytest.raises(plots.ChartError, match=r"serve-empty.json: no uncached .* list of \{concurrency"):
        plots.plot_file(empty)
    assert not (tmp_path / "serve-empty.png").exists()
    # A benchmark's own call reports the reason and does not fail the run it measured.
    assert plots.chart_beside(empty, {"model": "m"}, plots.serving) is None
    assert "no chart for" in capsys.readouterr().err
    # The command line goes on past a file it cannot chart, printing why.
    assert plots.main([str(broken), str(tmp_path / "serve-cpu-copy.json")]) == 0
    err = capsys.readouterr().err
    assert "skipped quality-broken.json" in err and "serve-cpu-copy.json" in err
