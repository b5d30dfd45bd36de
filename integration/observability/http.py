"""The HTTP edge's requests as metrics and spans: an ASGI middleware, labelled by route template.

The label is the template the router matched (``/fhir/{resource_type}/{id}``), never the raw path, which
holds resource ids and UIDs; a request no route matched is ``unmatched``. A W3C ``traceparent`` from
the caller is honoured, so a trace can begin in the EHR that called us.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import SpanKind

from integration.observability import metrics, tracing

UNMATCHED = "unmatched"


class RequestMetrics:
    """ASGI middleware: ``medbridge_http_requests`` and ``medbridge_http_request_duration_seconds`` per
    route template, method and status, and a server span per request while tracing is on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        method = scope["method"]
        try:
            if tracing.enabled():
                await self._traced(scope, receive, send_and_note, method)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            route = route_template(scope)
            metrics.HTTP_REQUESTS.labels(route, method, str(status)).inc()
            metrics.HTTP_REQUEST_SECONDS.labels(route, method).observe(time.perf_counter() - began)

    async def _traced(self, scope: dict[str, Any], receive: Any, send: Any, method: str) -> None:
        headers = dict(scope.get("headers") or ())
        with tracing.span(f"{method}", kind=SpanKind.SERVER, parent=headers.get(b"traceparent"),
                          attributes={"http.request.method": method}) as span:
            try:
                await self.app(scope, receive, send)
            finally:
                route = route_template(scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)


def route_template(scope: dict[str, Any]) -> str:
    """The matched route's path template (set on the scope by the router), else ``unmatched``."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(template) if template else UNMATCHED
