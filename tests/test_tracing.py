"""OpenTelemetry traces of answering's stages (retro_peft/tracing.py): spans from a real server's request into
the SDK's in-memory exporter; the environment switches them on (OTEL_TRACES_EXPORTER) and, unset, nothing
of OpenTelemetry is imported."""

import os
import subprocess
import sys

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from retro_peft import tracing
from retro_peft.domains.bank import AdapterBank
from retro_peft.serving.app import create_app
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder


def python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                          timeout=60)


@pytest.fixture
def exported():
    exporter = InMemorySpanExporter()
    tracing.enable(exporter, simple=True)
    yield exporter
    tracing.disable()


def test_a_request_is_traced_through_retrieve_prefill_and_decode(tmp_path, exported):
    single_thread()
    bank = AdapterBank(str(tiny_llama_folder(tmp_path / "base", smollm2_tokenizer())), max_new_tokens=4)
    bank.load("docs", tiny_index(tmp_path / "index", DOCS).path)
    settings = ServeSettings(auth={"allow_unauthenticated": True}, generation={"default_max_tokens": 4})
    with serve_in_thread(create_app(settings, bank)) as url:
        reply = httpx.post(f"{url}/v1/completions", json={"model": "docs", "prompt": "Who invented the piano?",
                                                          "retrieval": {"k": 2, "mode": "sparse"}}, timeout=60)
        assert reply.status_code == 200, reply.text
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert {"batch", "retrieve", "prefill", "decode"} <= spans.keys()
    batch = spans["batch"]
    assert batch.parent is None and batch.attributes["requests"] == 1 and list(batch.attributes["domains"]) == ["docs"]
    for stage in ("retrieve", "prefill", "decode"):  # one trace: the stages are the pass's children, in order
        assert spans[stage].parent.span_id == batch.context.span_id
        assert spans[stage].context.trace_id == batch.context.trace_id
    assert spans["retrieve"].attributes["k"] == 2 and spans["retrieve"].attributes["mode"] == "sparse"
    assert spans["retrieve"].end_time <= spans["prefill"].start_time <= spans["prefill"].end_time
    assert spans["prefill"].end_time <= spans["decode"].start_time < spans["decode"].end_time <= batch.end_time
    assert spans["prefill"].attributes["rows"] == 1 and spans["prefill"].attributes["tokens"] > 0
    assert batch.resource.attributes["service.name"] == "retro-peft"


def test_the_environment_turns_tracing_on_and_unset_it_costs_no_import():
    code = ("import sys\nfrom retro_peft import tracing\nwith tracing.span('retrieve', k=3):\n    pass\n"
            "print(tracing.active(), any(m.startswith('opentelemetry') for m in sys.modules))\ntracing.disable()\n")
    off = python(code)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["False", "False"]
    on = python(code, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="docs-api")
    assert on.returncode == 0, on.stderr
    assert on.stdout.startswith("True True") and '"name": "retrieve"' in on.stdout
    assert '"k": 3' in on.stdout and '"service.name": "docs-api"' in on.stdout
    missing = python(code, OTEL_TRACES_EXPORTER="zipkin")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].endswith("OTEL_TRACES_EXPORTER: no span exporter 'zipkin' is "
                                                            "installed (for otlp: pip install "
                                                            "opentelemetry-exporter-otlp)")
