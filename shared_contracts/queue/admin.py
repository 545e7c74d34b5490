"""What an operator asks of a queue: stats, dead letters, retry, purge."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo.asynchronous.collection import AsyncCollection

from shared_contracts import mongo
from shared_contracts.queue.documents import DEAD, DONE, PARKED, PENDING, STATUSES
from shared_contracts.queue.engine import to_pending

Collection = AsyncCollection[dict[str, Any]]


async def queue_stats(collection: Collection, *, now: datetime) -> dict[str, Any]:
    """Counts per status and per type, the oldest pending message's age, dead letters."""
    by_status = dict.fromkeys(STATUSES, 0)
    by_type: dict[str, dict[str, int]] = {}
    async for row in await collection.aggregate(
        [{"$group": {"_id": {"status": "$status", "type": "$type"}, "n": {"$sum": 1}}}]
    ):
        status, kind = str(row["_id"].get("status")), str(row["_id"].get("type"))
        by_status[status] = by_status.get(status, 0) + row["n"]
        by_type.setdefault(kind, {})[status] = row["n"]
    oldest = await collection.find_one(
        {"status": PENDING, "availableAt": {"$ne": PARKED}},
        projection={"createdAt": 1},
        sort=[("createdAt", 1)],
    )
    age = None
    if oldest and isinstance(oldest.get("createdAt"), datetime):
        age = max(0.0, (now - oldest["createdAt"]).total_seconds())
    return {
        "queue": collection.name,
        "byStatus": by_status,
        "byType": by_type,
        "oldestPendingAgeSeconds": age,
        "dead": by_status[DEAD],
    }


async def list_dead(
    collection: Collection, *, type_: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    query: dict[str, Any] = {"status": DEAD}
    if type_ is not None:
        query["type"] = type_
    cursor = collection.find(query, sort=[("updatedAt", -1)], limit=limit)
    return [document async for document in cursor]


def parse_id(text: str) -> Any:
    try:
        return ObjectId(text)
    except (InvalidId, TypeError):
        return text


async def retry_dead(collection: Collection, *, ids: list[str] | None, now: datetime) -> int:
    """Dead -> pending with a fresh attempt budget; lastError stays as the history."""
    query: dict[str, Any] = {"status": DEAD}
    if ids is not None:
        query["_id"] = {"$in": [parse_id(i) for i in ids]}
    fields = {"attempts": 0, "availableAt": now, "updatedAt": now}
    retried = await mongo.update_all(
        collection,
        {**query, "dedupeKey": {"$exists": False}},
        {"$set": {**fields, "status": PENDING}},
    )
    # A coalesced message may meet a newer pending one of its key: then it is superseded.
    async for document in collection.find({**query, "dedupeKey": {"$exists": True}}, {"_id": 1}):
        one = {"status": DEAD, "_id": document["_id"]}
        retried += await to_pending(collection, one, fields, now=now) == "pending"
    return retried


async def purge_done(collection: Collection) -> int:
    return await mongo.delete_all(collection, {"status": DONE})
