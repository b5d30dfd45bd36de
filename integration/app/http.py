"""The HTTP application: FHIR under /fhir, queries under /api, /health and /docs."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse

from integration.app import metrics as app_metrics
from integration.app.services import Services
from integration.auth import policy
from integration.auth import web as auth
from integration.delivery import queue
from integration.dicom import web as dicomweb
from integration.events import dead_letters
from integration.fhir import api as fhir_api
from integration.observability import multiprocess
from integration.observability.http import RequestMetrics
from integration.reports import api, quality, worklist


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="MedBridge",
        version="0.1.0",
        description="FHIR/DICOM integration with AI-assisted, clinician-reviewed DiagnosticReports.",
    )
    app.state.services = services
    origins = [o.strip() for o in services.settings.cors_origins.split(",") if o.strip()]
    if origins:
        # a DICOMweb viewer such as OHIF served from another origin reads studies and frames from here
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["*"], expose_headers=["ETag", "Location", "Content-Location", "Warning"],
        )
    # outermost: a request for another Host name (DNS rebinding) or a cross-origin write goes no further
    trusted_origins = frozenset(o.rstrip("/") for o in origins)
    app.add_middleware(auth.NetworkGuard, hosts=auth.allowed_hosts(services.settings), origins=trusted_origins)
    # outermost of all: refusals are counted too (by route template, never the raw path)
    app.add_middleware(RequestMetrics)
    app.state.authenticator = auth.build_authenticator(services.settings)
    fhir_api.install_exception_handlers(app)
    auth.install_exception_handlers(app)
    # every route but /health, /docs and the login and key routes needs a token; what else, the policy says
    app.include_router(fhir_api.router, dependencies=[
        Depends(auth.authorize(policy.fhir_requirement)), Depends(auth.fhir_json_only)])
    app.include_router(api.router, dependencies=[Depends(auth.authorize(policy.api_requirement))])
    # the reviewer's workstation (worklist, claims, quality, feedback): /api, under the same policy
    for workstation in (worklist.router, quality.router):
        app.include_router(workstation, dependencies=[Depends(auth.authorize(policy.api_requirement))])
    app.include_router(dicomweb.router, dependencies=[Depends(auth.authorize(policy.dicomweb_requirement))])
    app.include_router(auth.router)

    @app.get("/health", tags=["ops"])
    def health() -> JSONResponse:
        checks = {name: bool(check()) for name, check in services.health_checks.items()}
        checks["store"] = services.store.healthy()
        ok = all(checks.values())
        body: dict[str, object] = {"status": "ok" if ok else "degraded", "checks": checks}
        details: dict[str, object] = {}
        if checks["store"]:
            details["dicom_exports"] = queue.counts(services.store, "pacs")
            # set aside for an administrator (GET /api/dead-letters): worth a look, not a failing check
            waiting = dead_letters.waiting_by_topic(services.store)
            details["dead_letters"] = {"total": sum(waiting.values()), "by_topic": waiting}
            if services.settings.upstream_urls:
                details["writeback"] = queue.counts(services.store, "ehr")
        details.update({name: detail() for name, detail in services.health_details.items()})
        if details:
            body["details"] = details
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, dependencies=[Depends(auth.metrics_access)])
    def metrics() -> str:
        """Prometheus text format."""
        s = services.settings
        children = [multiprocess.folder(s.data_dir, kind) for kind, running in (  # their counts, summed in
            (multiprocess.DICOM_PROCESSES, s.dicom_processes > 1),
            (multiprocess.INFERENCE_PROCESSES, s.inference_processes and s.edges_enabled)) if running]
        counts = queue.counts(services.store, "ehr")
        exports = queue.counts(services.store, "pacs")
        return (
            "# HELP medbridge_writeback_pending Writebacks to the upstream EHR not yet sent\n"
            "# TYPE medbridge_writeback_pending gauge\n"
            f"medbridge_writeback_pending {counts['pending']}\n"
            "# HELP medbridge_writeback_dead Writebacks that need an administrator's replay\n"
            "# TYPE medbridge_writeback_dead gauge\n"
            f"medbridge_writeback_dead {counts['dead']}\n"
            "# HELP medbridge_dicom_export_pending DICOM exports of AI results to PACS peers not yet sent\n"
            "# TYPE medbridge_dicom_export_pending gauge\n"
            f"medbridge_dicom_export_pending {exports.get('pending', 0)}\n"
            "# HELP medbridge_dicom_export_dead DICOM exports that need an administrator's replay\n"
            "# TYPE medbridge_dicom_export_dead gauge\n"
            f"medbridge_dicom_export_dead {exports.get('dead', 0)}\n"
            + _dead_letter_metrics(dead_letters.waiting_by_topic(services.store))
        ) + "".join(text() for text in services.metrics_text) + app_metrics.exposition(services.store, children)

    return app


def _dead_letter_metrics(waiting: dict[str, int]) -> str:
    lines = ["# HELP medbridge_dead_letters Events set aside in the dead-letter store, not replayed yet, by topic",
             "# TYPE medbridge_dead_letters gauge"]
    lines += [f'medbridge_dead_letters{{topic="{topic}"}} {n}' for topic, n in sorted(waiting.items())]
    return "\n".join(lines) + "\n"
