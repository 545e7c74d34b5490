"""The telemetry database's collections (SPEC section 2) and their indexes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid

from shared_contracts.mongo import MAX_IN_IDS

EVENTS: Final = "events"  # raw events as ingested; _id = the event id (I2)
EVENTS_ASIDE: Final = "events_aside"  # copies of events the main line passed (processing/aside.py)
# Each has one writer: devices/ (user_metrics), identity/ (identity_map, known_users,
# known_keys), projection/writer.py (username_metrics). A test checks it on the AST.
USER_METRICS: Final = "user_metrics"  # per device (distinct_id): anonymous + per-user buckets
IDENTITY_MAP: Final = "identity_map"  # per userId: current username (unique) and devices
USERNAME_METRICS: Final = "username_metrics"  # the projection, per userId; username unique
KNOWN_KEYS: Final = "known_keys"  # API-key SHA-256 -> userId (replicated from the app)
KNOWN_USERS: Final = "known_users"  # userId -> current username and its name-clock seq
MIGRATIONS: Final = "migrations"
COUNTERS: Final = "counters"  # the events' arrival sequence (ingest/arrival.py)
ARRIVAL_COUNTER: Final = "event_arrival"
PROGRESS: Final = "ingest_progress"  # the watcher's high-water mark (processing/progress.py)
MAIN_LINE: Final = "arrival"  # its one document: the main line over the arrival sequence
ARRIVAL_HOLES: Final = "arrival_holes"  # arrival numbers that will never hold an event

#: How long a copy aside stays after it was applied: what went aside, and why, for an operator.
APPLIED_KEPT: Final = timedelta(days=7)

#: leaseUntil of an event no watcher has claimed yet: claimable at once.
UNCLAIMED: Final = datetime(1970, 1, 1, tzinfo=UTC)

Database = AsyncDatabase[dict[str, Any]]


async def find_by_ids(
    collection: AsyncCollection[dict[str, Any]],
    ids: Iterable[Any],
    *,
    projection: dict[str, Any] | None = None,
    session: AsyncClientSession | None = None,
) -> dict[Any, dict[str, Any]]:
    """Documents by _id, in bounded $in chunks, each one round trip (no getMore)."""
    wanted = sorted(set(ids))
    found: dict[Any, dict[str, Any]] = {}
    for start in range(0, len(wanted), MAX_IN_IDS):
        chunk = wanted[start : start + MAX_IN_IDS]
        # One more than can match: a first batch exactly as large as the answer leaves the
        # cursor open (the server cannot know it is done), and draining it costs a getMore.
        cursor = collection.find(
            {"_id": {"$in": chunk}}, projection, session=session, batch_size=len(chunk) + 1
        )
        async for document in cursor:
            found[document["_id"]] = document
    return found


async def update_by_ids(
    collection: AsyncCollection[dict[str, Any]],
    ids: list[Any],
    update: dict[str, Any],
    *,
    only: dict[str, Any] | None = None,
    session: AsyncClientSession,
) -> int:
    """One update_many per bounded $in chunk of ids (see MAX_IN_IDS), in the caller's
    transaction; ``only``: extra filter. Returns how many were modified."""
    modified = 0
    for start in range(0, len(ids), MAX_IN_IDS):
        chunk = {"_id": {"$in": ids[start : start + MAX_IN_IDS]}, **(only or {})}
        modified += (await collection.update_many(chunk, update, session=session)).modified_count
    return modified


def event_indexes() -> list[IndexModel]:
    """The indexes of ``events``: the arrival number alone, what the main line reads by. Every
    stored event pays for each index (bench/: the embedded server's insert rate roughly halves
    with the first secondary index), so the events set aside live in ``events_aside``."""
    return [IndexModel([("seq", ASCENDING)], name="arrival")]


def aside_indexes() -> list[IndexModel]:
    """The collection holds the events set aside and those applied in the last APPLIED_KEPT:
    small, so its indexes cost ingest nothing (ingest never writes here)."""
    return [
        # The claim: unclaimed (or lease run out) in arrival order. Applied and dead copies
        # carry a lease parked far ahead, so the claim never walks them.
        IndexModel([("leaseUntil", ASCENDING), ("seq", ASCENDING)], name="claim"),
        # Unapplied events of a device: who reached a device without an owner first (I3).
        IndexModel([("distinctId", ASCENDING), ("seq", ASCENDING)], name="by_device"),
        IndexModel([("claimToken", ASCENDING)], name="claim_token", sparse=True),
        IndexModel([("dead", ASCENDING), ("seq", ASCENDING)], name="dead", sparse=True),
        IndexModel([("processedAt", ASCENDING)], name="expire_applied",
                   expireAfterSeconds=int(APPLIED_KEPT.total_seconds())),
    ]  # fmt: skip


async def ensure_indexes(db: Database) -> None:
    # An event is never written after its insert: the one index it needs is its arrival
    # number (processing/progress.py reads above the high-water mark). The indexes older
    # releases kept for their events aside are dropped by processing/aside.py once it has
    # moved those events to events_aside.
    await db[EVENTS].create_indexes(event_indexes())
    await db[EVENTS_ASIDE].create_indexes(aside_indexes())
    # Holes ingest recorded are needed only until the mark passes them.
    await db[ARRIVAL_HOLES].create_index("at", name="expire", expireAfterSeconds=86_400)
    await db[USER_METRICS].create_indexes(
        [
            IndexModel([("userIds", ASCENDING)], name="user_ids"),
            IndexModel([("ownerUserId", ASCENDING)], name="owner", sparse=True),
        ]
    )
    # A user without a name here (its newest assignment not applied yet) has no username field.
    named = {"partialFilterExpression": {"username": {"$type": "string"}}, "unique": True}
    await db[IDENTITY_MAP].create_indexes(
        [
            IndexModel([("username", ASCENDING)], name="username", **named),
            # The username-keyed layout stored userId as a field: the upgrade finds its entries.
            # (Same name and options as that layout's index, so creating it is a no-op there.)
            IndexModel([("userId", ASCENDING)], name="user_id"),
        ]
    )
    await db[USERNAME_METRICS].create_indexes(
        [
            IndexModel([("username", ASCENDING)], name="username", **named),
            # GET /v1/stats looks the name up with this one: the embedded server never plans a
            # query on a partial index (tests/test_embedded_gaps.py) and read every projection.
            IndexModel([("username", ASCENDING)], name="username_lookup"),
            IndexModel([("userId", ASCENDING)], name="legacy_user_id", sparse=True),
        ]
    )
    await db[KNOWN_USERS].create_index("username", name="username")
    # Collections must exist before a transaction writes to them on older servers. Replicas
    # starting together race to create them: whoever comes second finds it done
    # (tests/test_replicas_start_together.py).
    existing = set(await db.list_collection_names())
    for name in (KNOWN_KEYS, MIGRATIONS, COUNTERS, PROGRESS, EVENTS_ASIDE):
        if name not in existing:
            with contextlib.suppress(CollectionInvalid):
                await db.create_collection(name)
    # Created here, once, so requests only ever increment it (never race to create it).
    await db[COUNTERS].update_one(
        {"_id": ARRIVAL_COUNTER}, {"$setOnInsert": {"value": 0}}, upsert=True
    )
    # The watcher's mark starts at the counter's value when it is first created: events
    # numbered before it were stored by a release that marked each one processed, and are
    # applied that way (processing/progress.py).
    counter = await db[COUNTERS].find_one({"_id": ARRIVAL_COUNTER})
    await db[PROGRESS].update_one(
        {"_id": MAIN_LINE},
        {"$setOnInsert": {"through": int(counter["value"]) if counter else 0, "gaps": [],
                          "attempts": 0, "batches": 0}},
        upsert=True,
    )  # fmt: skip
