"""Liveness and readiness."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pymongo.errors import PyMongoError

from swamp_app.deps import RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(runtime: RuntimeDep) -> dict[str, Any] | JSONResponse:
    """Ready for traffic: the database answers."""
    try:
        await runtime.client.admin.command("ping")
    except PyMongoError as exc:
        return JSONResponse({"status": "unavailable", "database": str(exc)}, status_code=503)
    return {"status": "ready", "database": "ok"}
