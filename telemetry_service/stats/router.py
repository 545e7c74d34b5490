"""GET /v1/stats?username= (the projection) or ?distinct_id= (one device's buckets)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from shared_contracts.api_errors import error_responses
from shared_contracts.messages import USERNAME_PATTERN
from telemetry_service.collections import USER_METRICS
from telemetry_service.deps import RuntimeDep
from telemetry_service.devices.models import Device
from telemetry_service.errors import InvalidQuery, NotFound
from telemetry_service.projection.writer import read_projection
from telemetry_service.stats.schemas import UsernameStats

router = APIRouter(prefix="/v1", tags=["stats"])


@router.get(
    "/stats",
    response_model=UsernameStats | Device,
    responses=error_responses(404, 422),
)
async def stats(
    runtime: RuntimeDep,
    username: Annotated[
        str | None, Query(min_length=3, max_length=39, pattern=USERNAME_PATTERN)
    ] = None,
    distinct_id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> UsernameStats | Device:
    """Exactly one of `username` and `distinct_id`. A registered user with no events yet has
    zeros; a username nobody holds (as telemetry knows it) is 404. Stats belong to the user,
    not the name: after a rename they answer under the new name, and a name someone else has
    taken since answers with the taker's own stats."""
    if (username is None) == (distinct_id is None):
        raise InvalidQuery(
            "give exactly one of username and distinct_id",
            details=[{"loc": "query", "msg": "exactly one of username, distinct_id"}],
        )
    if username is not None:
        projection = await read_projection(runtime.db, username=username)
        if projection is None:
            raise NotFound(f"no stats for username {username!r}")
        return UsernameStats.from_projection(projection)
    device = await runtime.db[USER_METRICS].find_one({"_id": distinct_id})
    if device is None:
        raise NotFound(f"no stats for distinct_id {distinct_id!r}")
    return Device.from_document(device)
