"""Telemetry's /admin endpoints (ADMIN_TOKEN): the backfill's state, and the command queue it
consumes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from shared_contracts.admin_api import ADMIN_ERRORS, ADMIN_ONLY, queue_admin_router
from shared_contracts.api_errors import error_responses
from shared_contracts.names import TELEMETRY_COMMANDS
from telemetry_service.backfill import Backfill
from telemetry_service.deps import RuntimeDep
from telemetry_service.processing.set_aside import (
    count_set_aside,
    list_set_aside,
    purge_set_aside,
    retry_set_aside,
)

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


class SetAsideEvent(BaseModel):
    id: str
    distinctId: str | None = None
    arrival: int | None = None
    receivedAt: datetime | None = None
    setAsideAt: datetime | None = None
    attempts: int = 0
    lastError: str | None = None


class SetAsideEvents(BaseModel):
    setAside: int
    events: list[SetAsideEvent]


EventId = Annotated[str, Field(min_length=1, max_length=200)]  # as long as ingest allows


class EventIds(BaseModel):
    ids: list[EventId] | None = Field(
        default=None, max_length=10_000, description="Event ids; omit for every set-aside event."
    )


@router.get("/events/dead", response_model=SetAsideEvents, responses=error_responses(422))
async def set_aside_events(
    runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> SetAsideEvents:
    """Events the watcher set aside (I11), newest first, with why: as `swamp-club events dead`."""
    rows = await list_set_aside(runtime.db, limit=limit)
    return SetAsideEvents(
        setAside=await count_set_aside(runtime.db),
        events=[SetAsideEvent.model_validate(row) for row in rows],
    )


@router.post("/events/dead/retry", responses=error_responses(400, 422))
async def retry_set_aside_events(runtime: RuntimeDep, body: EventIds) -> dict[str, int]:
    """Back to the watcher with a fresh attempt budget: `{"retried": n}`."""
    return {"retried": await retry_set_aside(runtime.db, ids=body.ids)}


@router.post("/events/dead/purge", responses=error_responses(400, 422))
async def purge_set_aside_events(runtime: RuntimeDep, body: EventIds) -> dict[str, int]:
    """Delete set-aside events for good (never counted): `{"purged": n}`."""
    return {"purged": await purge_set_aside(runtime.db, ids=body.ids)}


#: The queue this service consumes: its dead letters are telemetry's to inspect and retry.
queue_router = queue_admin_router(TELEMETRY_COMMANDS)
