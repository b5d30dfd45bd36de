"""MEDBRIDGE_LOG_FORMAT=json: one JSON object per line, with the current span's trace and span ids."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from integration.observability.logs import JsonLines


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("integration.events.publisher", logging.INFO, __file__, 1, message, args, None)


def test_a_json_line_names_the_span_it_was_logged_in_and_null_outside_one() -> None:
    formatter = JsonLines()
    outside = json.loads(formatter.format(record("study %s announced", "3f2a")))
    assert outside == {"time": outside["time"], "level": "INFO", "logger": "integration.events.publisher",
                       "message": "study 3f2a announced", "trace_id": None, "span_id": None}
    assert outside["time"].endswith("+00:00")
    tracer = TracerProvider().get_tracer("test")  # a provider of its own: the process-wide one stays unset
    with tracer.start_as_current_span("announce study") as span:
        inside = json.loads(formatter.format(record("announced")))
    context = span.get_span_context()
    assert (inside["trace_id"], inside["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")


def test_an_exception_is_one_field_of_the_same_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("medbridge", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonLines().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]
