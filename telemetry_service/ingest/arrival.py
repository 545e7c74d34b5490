"""The arrival sequence: a server-side number per stored event, in the order requests were
stored. The watcher claims in this order and a device's owner is decided by it (I3, I11):
never by the client's event id or clock.

One ``$inc`` per request reserves a range for all its events, then the events are inserted. The
watcher's mark does not pass a number still being inserted (processing/progress.py); numbers
that will never hold an event (a re-sent duplicate's, an insert that failed) are recorded here
as holes, so it need not wait for them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pymongo import ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from telemetry_service.collections import (
    ARRIVAL_COUNTER,
    ARRIVAL_HOLES,
    COUNTERS,
    EVENTS,
    Database,
)


async def reserve(db: Database, count: int, *, tries: int = 5) -> int:
    """Reserve ``count`` consecutive numbers; returns the first.

    The embedded server very rarely answers an applied increment with no document
    (tests/test_embedded_gaps.py): we cannot know that range, so we reserve another one; the
    lost range is a gap."""
    for _ in range(tries):
        counter = await db[COUNTERS].find_one_and_update(
            {"_id": ARRIVAL_COUNTER}, {"$inc": {"value": count}}, upsert=True,
            return_document=ReturnDocument.AFTER,
        )  # fmt: skip
        if counter is not None:
            return int(counter["value"]) - count + 1
    raise RuntimeError(f"the arrival counter answered nothing {tries} times")


async def record_holes(db: Database, numbers: list[int]) -> None:
    """These reserved numbers will never hold an event."""
    if numbers:
        now = datetime.now(UTC)
        await db[ARRIVAL_HOLES].insert_many([{"_id": n, "at": now} for n in numbers], ordered=False)


async def number_unsequenced(db: Database, *, session: AsyncClientSession | None = None) -> int:
    """Events stored by a release without the sequence, not yet applied: numbered before every
    other one (negative, below any numbered so already), in the order they were received.
    Idempotent: numbers only events that have none, so replicas doing it at once do no harm."""
    old = await db[EVENTS].find(
        {"processed": False, "seq": {"$exists": False}}, {"receivedAt": 1},
        sort=[("receivedAt", 1), ("_id", 1)], session=session,
    ).to_list()  # fmt: skip
    if old:
        lowest = await db[EVENTS].find_one(
            {"seq": {"$exists": True}}, {"seq": 1}, sort=[("seq", 1)], session=session
        )
        below = min(int(lowest["seq"]), 0) if lowest else 0
        await db[EVENTS].bulk_write(
            [
                UpdateOne(
                    {"_id": event["_id"], "seq": {"$exists": False}},
                    {"$set": {"seq": below - len(old) + position}},
                )
                for position, event in enumerate(old)
            ],
            ordered=False,
            session=session,
        )
    return len(old)
