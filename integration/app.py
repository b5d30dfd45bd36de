"""The HTTP application: FHIR under /fhir, queries under /api, /health and /docs."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from integration import api, dicomweb, fhir_api
from integration.dicom_export_queue import count_by_state
from integration.services import Services


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="MedBridge",
        version="0.1.0",
        description="FHIR/DICOM integration with AI-assisted, clinician-reviewed DiagnosticReports.",
    )
    app.state.services = services
    fhir_api.install_exception_handlers(app)
    app.include_router(fhir_api.router)
    app.include_router(api.router)
    app.include_router(dicomweb.router)

    @app.get("/health", tags=["ops"])
    def health() -> JSONResponse:
        checks = {name: bool(check()) for name, check in services.health_checks.items()}
        checks["store"] = services.store.healthy()
        ok = all(checks.values())
        body: dict[str, object] = {"status": "ok" if ok else "degraded", "checks": checks}
        if checks["store"]:
            body["details"] = {"dicom_exports": count_by_state(services.store)}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app
