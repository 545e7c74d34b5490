"""username_changed (#211): the app renames a user by command; telemetry re-keys what it owns.

In one transaction (I6): re-key identity_map[old] to new (or merge into an existing new entry),
recompute the new name's projection through the projection writer (which publishes its refresh),
delete the old name's projection and point known_users[userId] at the new name (I10). A command
whose seq is not newer than the last one applied for the user changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.messages import UsernameChanged
from telemetry_service.collections import IDENTITY_MAP, KNOWN_USERS
from telemetry_service.projection.writer import (
    delete_projections,
    read_projection,
    write_projections,
)
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)


async def apply_username_changed(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: UsernameChanged
) -> None:
    db = runtime.db
    known = await db[KNOWN_USERS].find_one({"_id": command.userId}, session=session)
    if known is not None and int(known.get("renameSeq", 0)) >= command.seq:
        log.info("username_changed seq %d for %s already applied", command.seq, command.userId)
        return
    old = await db[IDENTITY_MAP].find_one({"_id": command.oldUsername}, session=session)
    new = await db[IDENTITY_MAP].find_one({"_id": command.newUsername}, session=session)
    if old is not None:
        await _move_devices(runtime, session, command, old, new)
    await db[KNOWN_USERS].update_one(
        {"_id": command.userId},
        {"$set": {"username": command.newUsername, "renameSeq": command.seq}},
        upsert=True,
        session=session,
    )
    old_projection = await read_projection(db, command.oldUsername, session=session)
    await write_projections(
        db=db,
        refreshes=runtime.refreshes,
        reasons={command.newUsername: "identity_migration"},
        session=session,
        version_floors={
            command.newUsername: int((old_projection or {}).get("projectionVersion", 0))
        },
    )
    await delete_projections(db=db, usernames=[command.oldUsername], session=session)


async def _move_devices(
    runtime: TelemetryRuntime,
    session: AsyncClientSession,
    command: UsernameChanged,
    old: dict[str, Any],
    new: dict[str, Any] | None,
) -> None:
    entries = runtime.db[IDENTITY_MAP]
    devices = sorted(set(old.get("distinctIds", [])) | set((new or {}).get("distinctIds", [])))
    # _id cannot change in place: write the new entry (merged if it existed), drop the old one.
    await entries.update_one(
        {"_id": command.newUsername},
        {"$set": {"userId": command.userId, "distinctIds": devices}},
        upsert=True,
        session=session,
    )
    await entries.delete_one({"_id": command.oldUsername}, session=session)
