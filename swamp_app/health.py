"""Liveness and readiness."""

from typing import Any

import pymongo
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pymongo.errors import PyMongoError

from shared_contracts.api_errors import error_responses
from shared_contracts.observability import metrics_response, readiness
from shared_contracts.outages import READY_DB_TIMEOUT_SECONDS, unavailable
from shared_contracts.queue.metrics import update_queue_gauges
from swamp_app.deps import RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=error_responses(503))
async def readyz(request: Request, runtime: RuntimeDep) -> dict[str, Any] | JSONResponse:
    """Ready for traffic: the database answers (indexes were ensured at start-up) and the
    score-refresh consumer runs (when this process runs it)."""
    try:
        with pymongo.timeout(READY_DB_TIMEOUT_SECONDS):
            await runtime.client.admin.command("ping")
    except PyMongoError:
        return unavailable()
    return readiness(request.app.state.workers)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    """Prometheus metrics: requests, ingest and queue counters, queue depth and age, lags."""
    return await metrics_response(
        request, lambda: update_queue_gauges(runtime.client[runtime.settings.bus_db])
    )
