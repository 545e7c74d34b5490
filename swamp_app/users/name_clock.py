"""The name clock: one counter for every name assignment (registration or rename).

Each assignment increments it in the assignment's own transaction, so two assignments that
touch the same name commit in clock order (both write this document: the later one conflicts
and retries with a higher value). Telemetry compares these values across users to know who
holds a contested name (SPEC I6); per user they increase too, which makes a stale
``username_changed`` recognisable.
"""

from __future__ import annotations

from typing import Any, Final

from pymongo import DESCENDING, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from swamp_app.collections import COUNTERS, USERS

NAME_CLOCK: Final = "name_clock"


async def next_name_seq(db: AsyncDatabase[dict[str, Any]], *, session: AsyncClientSession) -> int:
    clock = await db[COUNTERS].find_one_and_update(
        {"_id": NAME_CLOCK},
        {"$inc": {"value": 1}},
        upsert=True,
        return_document=ReturnDocument.AFTER,
        session=session,
    )
    assert clock is not None  # an upsert returning the document after always finds one
    return int(clock["value"])


async def ensure_name_clock(db: AsyncDatabase[dict[str, Any]]) -> None:
    """Start the clock above every per-user ``renameSeq`` written before it existed, so every
    new assignment is newer than anything telemetry has applied. Scans once: afterwards the
    clock document exists and this is one read."""
    if await db[COUNTERS].find_one({"_id": NAME_CLOCK}) is not None:
        return
    newest = await db[USERS].find_one(
        {"renameSeq": {"$exists": True}}, {"renameSeq": 1}, sort=[("renameSeq", DESCENDING)]
    )
    start = int((newest or {}).get("renameSeq", 0))
    await db[COUNTERS].update_one({"_id": NAME_CLOCK}, {"$max": {"value": start}}, upsert=True)
