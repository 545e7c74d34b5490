"""Events set aside: what the watcher could not apply, kept with its reason, never counted,
until an operator retries (or purges) it. The same functions serve
``swamp-club events dead|retry|purge`` and the admin API.

Set-aside events are copies in ``events_aside`` (processing/aside.py) with ``dead: true`` and a
lease parked far in the future, so the claim never returns them; index ``dead`` lists them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts import mongo
from telemetry_service.collections import EVENTS, EVENTS_ASIDE, UNCLAIMED, Database

SET_ASIDE: Final = {"dead": True, "processed": False}


def _selected(ids: list[str] | None) -> dict[str, Any]:
    return {**SET_ASIDE, **({"_id": {"$in": ids}} if ids is not None else {})}


async def count_set_aside(db: Database) -> int:
    return await db[EVENTS_ASIDE].count_documents(SET_ASIDE)


async def list_set_aside(db: Database, *, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first: id, device, arrival, when received, attempts and why."""
    cursor = db[EVENTS_ASIDE].find(
        SET_ASIDE,
        {
            "distinctId": 1,
            "seq": 1,
            "receivedAt": 1,
            "attempts": 1,
            "lastError": 1,
            "setAsideAt": 1,
        },
        sort=[("seq", -1)],
        limit=limit,
    )
    return [
        {
            "id": doc["_id"],
            "distinctId": doc.get("distinctId"),
            "arrival": doc.get("seq"),
            "receivedAt": doc.get("receivedAt"),
            "setAsideAt": doc.get("setAsideAt"),
            "attempts": doc.get("attempts", 0),
            "lastError": doc.get("lastError"),
        }
        async for doc in cursor
    ]


async def retry_set_aside(db: Database, *, ids: list[str] | None) -> int:
    """Back to the watcher with a fresh attempt budget (``ids`` None: all of them). The last
    error stays as history. In transactions of a bounded number of events (see
    ``shared_contracts.mongo``): a conflict with a watcher's batch is retried, never a deadlock
    of the embedded server."""
    return await mongo.update_all(
        db[EVENTS_ASIDE],
        _selected(ids),
        {
            "$set": {"attempts": 0, "leaseUntil": UNCLAIMED, "retriedAt": datetime.now(UTC)},
            "$unset": {"dead": "", "claimToken": ""},
        },
    )


async def purge_set_aside(db: Database, *, ids: list[str] | None) -> int:
    """Delete set-aside events for good: they were never counted, and will not be. The stored
    event goes with its copy, in the same transaction, so a re-send of the same event id by the
    CLI is then stored again as new (see retry_set_aside)."""
    purged = 0
    async for chunk in _set_aside_ids(db, ids):

        async def purge(session: AsyncClientSession, chunk: list[str] = chunk) -> int:
            # Again inside the transaction: an operator's retry may have come in between.
            still = {**SET_ASIDE, "_id": {"$in": chunk}}
            dead = [
                d["_id"] async for d in db[EVENTS_ASIDE].find(still, {"_id": 1}, session=session)
            ]
            await db[EVENTS_ASIDE].delete_many({**still, "_id": {"$in": dead}}, session=session)
            await db[EVENTS].delete_many({"_id": {"$in": dead}}, session=session)
            return len(dead)

        purged += await mongo.in_transaction(db.client, purge)
    return purged


async def _set_aside_ids(db: Database, ids: list[str] | None) -> AsyncIterator[list[str]]:
    """The ids selected, in chunks of at most mongo.MAX_IN_IDS."""
    chunk: list[str] = []
    async for document in db[EVENTS_ASIDE].find(_selected(ids), {"_id": 1}, sort=[("_id", 1)]):
        chunk.append(document["_id"])
        if len(chunk) == mongo.MAX_IN_IDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
