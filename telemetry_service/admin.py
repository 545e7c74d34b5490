"""Telemetry's /admin endpoints (ADMIN_TOKEN): the backfill's state, and the command queue it
consumes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from shared_contracts.admin_api import ADMIN_ERRORS, ADMIN_ONLY, queue_admin_router
from shared_contracts.names import TELEMETRY_COMMANDS
from telemetry_service.backfill import Backfill
from telemetry_service.deps import RuntimeDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=ADMIN_ONLY, responses=ADMIN_ERRORS)


class BackfillStatus(BaseModel):
    status: Literal["pending", "running", "done"]
    users: int = 0
    batches: int = 0
    lastUserId: str | None = None
    leaseOwner: str | None = None
    leaseUntil: datetime | None = None
    createdAt: datetime | None = None
    finishedAt: datetime | None = None
    reruns: int = 0


@router.get("/backfill", response_model=BackfillStatus)
async def backfill_status(runtime: RuntimeDep) -> BackfillStatus:
    """The one-time backfill's marker (I7): its state and progress, as `telemetry backfill
    --status` shows it."""
    marker = await Backfill(runtime).status()
    return BackfillStatus.model_validate(marker)


#: The queue this service consumes: its dead letters are telemetry's to inspect and retry.
queue_router = queue_admin_router(TELEMETRY_COMMANDS)
