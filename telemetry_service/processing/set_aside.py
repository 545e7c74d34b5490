"""Events set aside: what the watcher could not apply, kept with its reason, never counted,
until an operator retries (or purges) it. The same functions serve
``swamp-club events dead|retry|purge`` and the admin API.

Set-aside events are unprocessed events with ``dead: true`` and a lease parked far in the future,
so the claim (on ``{processed, seq}``) never returns them and listing them walks only the
unprocessed part of that same index.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from shared_contracts import mongo
from telemetry_service.collections import EVENTS, UNCLAIMED, Database

SET_ASIDE: Final = {"processed": False, "dead": True}


def _selected(ids: list[str] | None) -> dict[str, Any]:
    return {**SET_ASIDE, **({"_id": {"$in": ids}} if ids is not None else {})}


async def count_set_aside(db: Database) -> int:
    return await db[EVENTS].count_documents(SET_ASIDE)


async def list_set_aside(db: Database, *, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first: id, device, arrival, when received, attempts and why."""
    cursor = db[EVENTS].find(
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
        db[EVENTS],
        _selected(ids),
        {
            "$set": {"attempts": 0, "leaseUntil": UNCLAIMED, "retriedAt": datetime.now(UTC)},
            "$unset": {"dead": "", "claimToken": ""},
        },
    )


async def purge_set_aside(db: Database, *, ids: list[str] | None) -> int:
    """Delete set-aside events for good: they were never counted, and will not be. A re-send
    of the same event id by the CLI is then stored again as new (see retry_set_aside)."""
    return await mongo.delete_all(db[EVENTS], _selected(ids))
