"""OpenTelemetry spans around the stages of answering (retrieve, prefill, decode), when an exporter is asked for.

    with span("retrieve", questions=3):
        ...

Tracing is on when the OpenTelemetry SDK is installed (`pip install 'retro-peft[otel]'`) and OpenTelemetry's
own environment variables name an exporter: OTEL_TRACES_EXPORTER (e.g. `console`, or `otlp` with
opentelemetry-exporter-otlp installed), or an OTLP endpoint (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, which
means `otlp`). OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service as usual (default:
retro-peft). Otherwise `span` is a shared no-op context and nothing of OpenTelemetry is imported.

The environment is read at the first span; `enable` starts tracing with given exporters instead (tests, or
an application that wants spans without the environment). This module sits below every stage (as `errors`
does), so the index, generation and serving code can all open spans without importing one another.
"""

from __future__ import annotations

import contextlib
import os

_OFF = contextlib.nullcontext()
_tracer = None  # None: not decided yet; False: off; else an opentelemetry Tracer
_provider = None  # the TracerProvider `enable` made (shut down by `disable`)
_EXPORTERS = "opentelemetry_traces_exporter"  # the entry point group OpenTelemetry's exporters register under


def span(name: str, **attributes):
    """A context manager timing `name` as a span (a child of the current one), or a no-op when tracing is off."""
    if not active():
        return _OFF
    return _tracer.start_as_current_span(name, attributes=attributes)


def active() -> bool:
    """Whether spans are recorded (the first call reads the environment: a server calls it at start-up, so a
    misconfigured exporter is an error then, not in the middle of a request)."""
    global _tracer
    if _tracer is None:
        _tracer = _from_environment()
    return _tracer is not False


def enable(*exporters, simple: bool = False) -> None:
    """Trace from now on with these span exporters (`simple`: each span exported as it ends, no batching)."""
    global _tracer, _provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    disable()
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "retro-peft"})
    _provider = TracerProvider(resource=resource)
    for exporter in exporters:
        _provider.add_span_processor((SimpleSpanProcessor if simple else BatchSpanProcessor)(exporter))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # none yet: be the process's
        trace.set_tracer_provider(_provider)  # where other instrumentation (FastAPI's, say) finds it too
    _tracer = _provider.get_tracer("retro_peft")


def disable() -> None:
    """Stop tracing; the spans already ended are exported first."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer, _provider = False, None


def _exporter_names() -> list[str]:
    """The exporters the environment asks for, as OpenTelemetry's own auto-configuration reads it."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or
                      os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def _from_environment():
    names = _exporter_names()
    if not names:
        return False
    from importlib.metadata import entry_points

    from retro_peft.errors import InputError

    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        raise InputError(f"OTEL_TRACES_EXPORTER asks for {', '.join(names)} but the OpenTelemetry SDK is not "
                         "installed: pip install 'retro-peft[otel]'") from None
    exporters = []
    for name in names:
        found = entry_points(group=_EXPORTERS, name=name)
        if not found:
            raise InputError(f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed (for otlp: pip install "
                             "opentelemetry-exporter-otlp)")
        exporters.append(next(iter(found)).load()())
    enable(*exporters)
    return _tracer
