"""GET /v1/stats?username= (a user's projection) or ?distinct_id= (one device's buckets).

Device ids attribute anonymous history (I3), so whoever knows one could send events "for" its
owner: they are shown only to the owner (its API key) and to operators (the admin token),
never on the public projection (SPEC I12).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request

from shared_contracts.admin_api import is_admin
from shared_contracts.api_errors import Unauthorized, error_responses
from shared_contracts.keys import api_key_hash, presented_key
from shared_contracts.messages import USERNAME_PATTERN
from telemetry_service.collections import USER_METRICS
from telemetry_service.deps import RuntimeDep
from telemetry_service.devices.models import Device
from telemetry_service.errors import InvalidQuery, NotFound
from telemetry_service.identity.keys import known_keys
from telemetry_service.projection.writer import read_projection
from telemetry_service.stats.schemas import OwnUsernameStats, UsernameStats

router = APIRouter(prefix="/v1", tags=["stats"])


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who asks: an operator (admin token), a user (a live API key), or anyone."""

    admin: bool = False
    user_id: str | None = None


async def viewer(
    request: Request,
    runtime: RuntimeDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Viewer:
    if is_admin(request, authorization):
        return Viewer(admin=True)
    try:
        key = presented_key(x_api_key, authorization)
    except Unauthorized:
        return Viewer()
    if key is None:
        return Viewer()
    found = await known_keys(runtime.db, [api_key_hash(key)])
    owner = next(iter(found.values())).owner if found else None
    return Viewer(user_id=owner)


ViewerDep = Annotated[Viewer, Depends(viewer)]


@router.get(
    "/stats",
    response_model=OwnUsernameStats | UsernameStats | Device,
    responses=error_responses(401, 404, 422),
)
async def stats(
    runtime: RuntimeDep,
    who: ViewerDep,
    username: Annotated[
        str | None, Query(min_length=3, max_length=39, pattern=USERNAME_PATTERN)
    ] = None,
    distinct_id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> OwnUsernameStats | UsernameStats | Device:
    """Exactly one of `username` and `distinct_id`. A registered user with no events yet has
    zeros; a username nobody holds (as telemetry knows it) is 404. Stats belong to the user,
    not the name: after a rename they answer under the new name, and a name someone else has
    taken since answers with the taker's own stats. `distinctIds` only for the user's own key
    or the admin token; `distinct_id` needs the device owner's key (its anonymous bucket and
    the owner's own) or the admin token (every bucket)."""
    if (username is None) == (distinct_id is None):
        raise InvalidQuery(
            "give exactly one of username and distinct_id",
            details=[{"loc": "query", "msg": "exactly one of username, distinct_id"}],
        )
    if username is not None:
        projection = await read_projection(runtime.db, username=username)
        if projection is None:
            raise NotFound(f"no stats for username {username!r}")
        if who.admin or who.user_id == projection["_id"]:
            return OwnUsernameStats.from_projection(projection)
        return UsernameStats.from_projection(projection)
    if not who.admin and who.user_id is None:
        raise Unauthorized("device stats need the owner's API key or the admin token")
    document = await runtime.db[USER_METRICS].find_one({"_id": distinct_id})
    device = Device.from_document(document) if document else None
    if device is None or not (who.admin or device.ownerUserId == who.user_id):
        # Not the owner: the same answer as for a device that does not exist.
        raise NotFound(f"no stats for distinct_id {distinct_id!r}")
    if who.admin:
        return device
    own = {u: b for u, b in device.users.items() if u == who.user_id}
    return device.model_copy(update={"users": own})
