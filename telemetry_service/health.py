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
from telemetry_service import counters
from telemetry_service.backfill import Backfill
from telemetry_service.deps import RuntimeDep
from telemetry_service.processing.set_aside import count_set_aside

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=error_responses(503))
async def readyz(request: Request, runtime: RuntimeDep) -> dict[str, Any] | JSONResponse:
    """Ready for traffic: the database answers (indexes were ensured at start-up), the workers
    run (when this process runs them); the backfill's state is reported, not required."""
    try:
        with pymongo.timeout(READY_DB_TIMEOUT_SECONDS):
            await runtime.client.admin.command("ping")
            backfill = await Backfill(runtime).status()
    except PyMongoError:
        return unavailable()
    return readiness(
        request.app.state.workers,
        backfill={
            "status": backfill.get("status"),
            "users": backfill.get("users", 0),
            "lastUserId": backfill.get("lastUserId"),
        },
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    """Prometheus metrics: requests, ingest and queue counters, queue depth and age, lags."""

    async def update() -> None:
        await update_queue_gauges(runtime.client[runtime.settings.bus_db])
        counters.EVENTS_SET_ASIDE.set(await count_set_aside(runtime.db))

    return await metrics_response(request, update)
