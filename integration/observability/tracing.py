"""Traces with OpenTelemetry: one trace per study or patient record, from the C-STORE association or the
FHIR request through the outbox, each Kafka hop, the workers, the report and each delivery.

Off by default: with no exporter configured no tracer provider is installed, the API's no-op tracer
answers every call and no ``traceparent`` is stored or sent. :func:`configure` installs the SDK when
the standard ``OTEL_*`` variables ask for OTLP (``OTEL_TRACES_EXPORTER=otlp``, or an
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; the exporter reads the rest of
them itself) or when ``MEDBRIDGE_TRACE_FILE`` names a file for spans as JSON lines (tests and a quick
look without a collector).

The context crosses the store as a W3C ``traceparent`` string (outbox rows, change trackers, delivery
jobs) and Kafka as a ``traceparent`` message header (OpenTelemetry messaging conventions). Span
attributes carry topics, groups, partitions and route templates: never a UID or patient reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"
_TRUE = ("1", "true", "yes", "on")


def configure(service_name: str, trace_file: Path | None = None) -> Callable[[], None]:
    """Install the SDK's tracer provider for this process when an exporter is asked for (see the module
    docstring); returns what flushes and shuts it down at exit (a no-op when nothing was installed).
    Once per process: the composition of ``medbridge run``, not the Runtime (tests start many)."""
    otlp = _otlp_requested()
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() in _TRUE or not (otlp or trace_file):
        return lambda: None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name),
                                "service.instance.id": str(os.getpid())})
    provider = TracerProvider(resource=resource)
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if trace_file:
        # written as each span ends: a process killed outright keeps what it had finished
        from integration.observability.span_file import JsonLinesSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(trace_file)))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _otlp_requested() -> bool:
    exporters = {e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").lower().split(",")}
    if "none" in exporters:
        return False
    return "otlp" in exporters or bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def enabled() -> bool:
    """Whether this process records spans (a provider was installed); the API's proxy answers when not."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def tracer() -> trace.Tracer:
    return trace.get_tracer("medbridge")


def current_traceparent() -> str | None:
    """The current span's W3C traceparent, to store beside what it causes; None when not tracing."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def context_of(traceparent: str | bytes | None) -> otel_context.Context | None:
    """The context a stored or received traceparent names (None: start a new trace)."""
    if not traceparent:
        return None
    value = traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) else traceparent
    return _PROPAGATOR.extract({TRACEPARENT: value})


def header_traceparent(headers: Sequence[tuple[str, bytes]] | None) -> bytes | None:
    """The traceparent among Kafka message headers, if any."""
    for name, value in headers or ():
        if name == TRACEPARENT:
            return value
    return None


def traceparent_header() -> list[tuple[str, bytes]]:
    """The Kafka header that carries the current span to the consumer (empty when not tracing)."""
    value = current_traceparent()
    return [(TRACEPARENT, value.encode("ascii"))] if value else []


@contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, parent: str | bytes | None = None,
         attributes: dict[str, Any] | None = None) -> Iterator[Span]:
    """A span named ``name``, child of ``parent`` (a traceparent) when given, else of the current span."""
    with tracer().start_as_current_span(name, context=context_of(parent), kind=kind,
                                        attributes=attributes) as current:
        yield current


def ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None outside a recorded span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
