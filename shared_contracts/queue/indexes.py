"""Every index the two queues need; idempotent, run by both services at start-up."""

from __future__ import annotations

import contextlib
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from shared_contracts.names import QUEUE_COLLECTIONS
from shared_contracts.queue.documents import PENDING

TTL_INDEX = "done_ttl"
ORDERING_INDEX = "unfinished_by_key"
#: Indexes earlier releases created and nothing queries any more: dropped at start-up.
RETIRED_INDEXES = ("ordering",)


def queue_indexes(done_retention_seconds: int) -> list[IndexModel]:
    return [
        # The claim: equality on status, then the sort/range field availableAt.
        IndexModel([("status", ASCENDING), ("availableAt", ASCENDING)], name="claim"),
        # Coalescing: at most one pending message per dedupeKey.
        IndexModel(
            [("dedupeKey", ASCENDING)],
            name="one_pending_per_dedupe_key",
            unique=True,
            partialFilterExpression={"status": PENDING, "dedupeKey": {"$exists": True}},
        ),
        # The publish's upsert looks the pending message up with this one: the embedded server
        # never plans a query on a partial index (tests/test_embedded_gaps.py), and scanned the
        # whole collection, done messages included, for every score refresh published.
        IndexModel([("dedupeKey", ASCENDING), ("status", ASCENDING)], name="dedupe_lookup"),
        # Ordering keys: the unfinished messages of some keys, one status at a time (the
        # earlier-message check, the promotion of the next in line). Status first, and no
        # partial filter: the embedded server plans equality fields followed by one $in or
        # range, on an index without a partial filter only; on the partial (orderingKey,
        # orderSeq) index it read every message a key ever had, done ones included.
        IndexModel(
            [("status", ASCENDING), ("orderingKey", ASCENDING), ("orderSeq", ASCENDING)],
            name=ORDERING_INDEX,
        ),
        IndexModel([("status", ASCENDING), ("leaseUntil", ASCENDING)], name="reap"),
        IndexModel([("status", ASCENDING), ("type", ASCENDING)], name="status_type"),
        # doneAt is set only on completion, so only done messages expire.
        IndexModel(
            [("doneAt", ASCENDING)], name=TTL_INDEX, expireAfterSeconds=done_retention_seconds
        ),
    ]


async def ensure_queue_indexes(
    bus: AsyncDatabase[dict[str, Any]], *, done_retention_seconds: int
) -> None:
    for name in QUEUE_COLLECTIONS:
        collection = bus[name]
        await _sync_ttl(collection, done_retention_seconds)
        await collection.create_indexes(queue_indexes(done_retention_seconds))
        await _drop_retired(collection)


async def _drop_retired(collection: AsyncCollection[dict[str, Any]]) -> None:
    """Every queue write maintains every index: one nothing reads is pure cost."""
    existing = await collection.index_information()
    for name in RETIRED_INDEXES:
        if name in existing:
            with contextlib.suppress(OperationFailure):  # a replica dropped it first
                await collection.drop_index(name)


async def _sync_ttl(collection: AsyncCollection[dict[str, Any]], seconds: int) -> None:
    """A changed retention setting updates the existing TTL index instead of conflicting."""
    existing = await collection.index_information()
    current = existing.get(TTL_INDEX, {}).get("expireAfterSeconds")
    if current is not None and current != seconds:
        await collection.database.command(
            {
                "collMod": collection.name,
                "index": {"name": TTL_INDEX, "expireAfterSeconds": seconds},
            }
        )
