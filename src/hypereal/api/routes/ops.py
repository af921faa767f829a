"""Operations endpoints, outside the API prefixes and without authentication: liveness
(``/health``), readiness (``/ready``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from hypereal.api.deps import ServicesDep
from hypereal.api.responses import FastJSONResponse
from hypereal.observability.metrics import DatabaseMetrics, exposition
from hypereal.observability.readiness import readiness

router = APIRouter(include_in_schema=False)


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(services: ServicesDep) -> JSONResponse:
    """Readiness: 200 when the database, the broker and the media store are reachable, else
    503 naming those that are not."""
    checks = await readiness(services)
    failing = [f"{name} ({answer})" for name, answer in checks.items() if answer != "ok"]
    if not failing:
        return FastJSONResponse({"status": "ready", "checks": checks})
    body: dict[str, Any] = {
        "status": "unavailable",
        "error": "Not ready: " + "; ".join(failing),
        "checks": checks,
    }
    return FastJSONResponse(body, status_code=503)


@router.get("/metrics")
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus text format: this process's counters, then the database's totals."""
    state = request.app.state
    database = getattr(state, "database_metrics", None)
    if database is None:
        database = state.database_metrics = DatabaseMetrics(services.db)
    return Response(await exposition(database), media_type=CONTENT_TYPE_LATEST)
