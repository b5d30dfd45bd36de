"""Spans as JSON lines in a file (``MEDBRIDGE_TRACE_FILE``): what the cross-process trace test reads, and a
look at traces without a collector. Loaded only when that setting is given (the SDK stays out otherwise)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class JsonLinesSpanExporter(SpanExporter):
    """Each finished span as one JSON line (ids in hex, the process id, name, kind, attributes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # one write(2) per line on an O_APPEND file: processes sharing the file never interleave lines
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            for span in spans:
                os.write(fd, (json.dumps(_span_record(span)) + "\n").encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _span_record(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None  # a finished SDK span has its context
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name, "kind": span.kind.name, "pid": os.getpid(),
        "start": span.start_time, "end": span.end_time, "attributes": dict(span.attributes or {}),
    }
