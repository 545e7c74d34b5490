"""Names and devices of users (I3, I6). Everything here is keyed by userId.

A name assignment ("user u is called N as of seq") comes from the app with its *name clock*
(``seq``, one counter across all users). Applying it:

- changes nothing if u already applied a newer (or the same) assignment;
- takes N from another user v who holds it here with an *older* seq: v must have been renamed
  in the app before u took the name, and v's own command is still on its way, so v is nameless
  until it arrives;
- leaves u nameless if v holds N with a *newer* seq: u has renamed since, and that newer
  command is still on its way.

Data never moves between userIds: only the label does. ``identity_map`` and ``known_users``
carry the same name and are always written together; ``identity_map.username`` is unique.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from telemetry_service.collections import IDENTITY_MAP, KNOWN_USERS, Database, find_by_ids
from telemetry_service.devices.store import devices_of_user
from telemetry_service.identity.models import KnownUser


async def assign_name(
    db: Database, *, user_id: str, username: str, seq: int, session: AsyncClientSession
) -> set[str]:
    """Apply "``user_id`` is called ``username`` as of ``seq``". Returns the users whose name
    changed here (their projections must be rewritten); empty for a stale assignment."""
    me = await db[KNOWN_USERS].find_one({"_id": user_id}, session=session)
    if me is not None and KnownUser.from_document(me).nameSeq >= seq:
        return set()
    return await claim_name(db, user_id=user_id, username=username, seq=seq, session=session)


async def claim_name(
    db: Database, *, user_id: str, username: str, seq: int, session: AsyncClientSession
) -> set[str]:
    """The name goes to whichever claim is newer on the app's clock (see the module doc)."""
    holder_doc = await db[KNOWN_USERS].find_one(
        {"username": username, "_id": {"$ne": user_id}}, session=session
    )
    changed = {user_id}
    name: str | None = username
    if holder_doc is not None:
        holder = KnownUser.from_document(holder_doc)
        if holder.nameSeq > seq:
            name = None
        else:
            await _set_name(db, user_id=holder.userId, username=None, session=session)
            changed.add(holder.userId)
    await _set_name(db, user_id=user_id, username=name, seq=seq, session=session)
    return changed


async def _set_name(
    db: Database,
    *,
    user_id: str,
    username: str | None,
    session: AsyncClientSession,
    seq: int | None = None,
) -> None:
    # A missing name is an absent field: the unique index covers string names only.
    name_op: dict[str, Any] = (
        {"$set": {"username": username}} if username else {"$unset": {"username": ""}}
    )
    known_op = {**name_op}
    if seq is not None:
        known_op["$set"] = {**known_op.get("$set", {}), "nameSeq": seq}
    await db[KNOWN_USERS].update_one({"_id": user_id}, known_op, upsert=True, session=session)
    await db[IDENTITY_MAP].update_one(
        {"_id": user_id},
        {**name_op, "$setOnInsert": {"distinctIds": []}},
        upsert=True,
        session=session,
    )


async def register_user(
    db: Database, *, user_id: str, username: str, seq: int, session: AsyncClientSession
) -> set[str]:
    """A user the app created: its first name, and any devices it already has buckets on
    (events applied before the registration reached us). Returns the users to re-project."""
    changed = await assign_name(db, user_id=user_id, username=username, seq=seq, session=session)
    devices = await devices_of_user(db, user_id, session=session)
    await bind_devices(db, {user_id: set(devices)}, session=session)
    return changed | {user_id}


async def bind_devices(
    db: Database, devices_by_user: Mapping[str, Iterable[str]], *, session: AsyncClientSession
) -> None:
    """Add devices to users' entries (creating an entry, nameless, for a user not yet known)."""
    if not devices_by_user:
        return
    await db[IDENTITY_MAP].bulk_write(
        [
            UpdateOne(
                {"_id": user_id},
                {"$addToSet": {"distinctIds": {"$each": sorted(devices)}}},
                upsert=True,
            )
            for user_id, devices in sorted(devices_by_user.items())
        ],
        ordered=False,
        session=session,
    )


async def load_entries(
    db: Database, user_ids: Iterable[str], *, session: AsyncClientSession | None = None
) -> dict[str, dict[str, Any]]:
    return await find_by_ids(db[IDENTITY_MAP], user_ids, session=session)


async def user_ids_after(db: Database, after: str | None, *, limit: int) -> list[str]:
    """The next ``limit`` userIds in order, ids only: one read, no cursor left open. The
    backfill walks users by these pages and reads each batch's entries by id: the embedded
    server plans no ``_id`` range on the ``_id`` index (README), so a range read per batch
    scanned every entry, and the backfill slowed with the population."""
    query = {"_id": {"$gt": after}} if after is not None else {}
    cursor = db[IDENTITY_MAP].find(
        query, {"_id": 1}, sort=[("_id", 1)], limit=limit, batch_size=limit + 1
    )
    return [str(document["_id"]) async for document in cursor]


async def entries_after(
    db: Database, after: str | None, *, limit: int, session: AsyncClientSession | None = None
) -> list[dict[str, Any]]:
    """The next ``limit`` entries in userId order: how the backfill and verify walk users."""
    query = {"_id": {"$gt": after}} if after is not None else {}
    cursor = db[IDENTITY_MAP].find(
        query, sort=[("_id", 1)], limit=limit, batch_size=limit, session=session
    )
    return await cursor.to_list()
