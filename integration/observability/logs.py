"""Log lines as text (the default) or as JSON lines (``MEDBRIDGE_LOG_FORMAT=json``) for a log shipper.

A JSON line holds time (UTC, ISO 8601), level, logger, message, and the trace_id and span_id of the
span current where the record was made (null when not tracing), so a log line leads to its trace. The
format changes nothing about what is logged: the filters on MedBridge's loggers (identifiers hashed
with integration.phi.uid_hash, peer bytes dropped, repeats rate-limited) run before any formatter.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

from integration.observability import tracing

LogFormat = Literal["text", "json"]


class JsonLines(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        ids = tracing.ids()
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": ids[0] if ids else None,
            "span_id": ids[1] if ids else None,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def install(log_format: LogFormat, level: int, text_format: str) -> None:
    """Configure the root logger once for this process: ``text_format`` lines or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(text_format))
    logging.basicConfig(level=level, handlers=[handler])
