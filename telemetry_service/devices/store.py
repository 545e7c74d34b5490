"""The only writer of ``user_metrics``: applies attributed events to their devices' buckets.

A device document holds one bucket for its anonymous events (``anon``) and one per user who
authenticated on it (``users.<userId>``: keyed by id, so renames never touch it), plus
``ownerUserId`` (I3) and ``userIds`` (an index of the users that have a bucket).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from telemetry_service import counters
from telemetry_service.collections import USER_METRICS, Database, find_by_ids
from telemetry_service.devices.buckets import BucketDelta, bucket_path, merge_operators, seen_at
from telemetry_service.ingest.schemas import CliEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttributedEvent:
    """An event whose key has been resolved: ``user_id`` None counts as the device's anonymous
    event (no key, a revoked key, or a key unknown after the grace period)."""

    id: str
    event: CliEvent
    user_id: str | None
    received_at: datetime
    #: The server's arrival sequence: ownership goes to the first authenticated arrival (I3).
    arrival: int

    @property
    def device(self) -> str:
        return self.event.distinct_id


@dataclass(frozen=True, slots=True)
class DeviceWrite:
    """What applying a batch did: every device's owner after it, and the devices that got one."""

    owners: dict[str, str]
    new_owners: dict[str, str]


async def load_devices(
    db: Database,
    ids: Iterable[str],
    *,
    owned_between: tuple[str, str] | None = None,
    session: AsyncClientSession | None = None,
) -> dict[str, dict[str, Any]]:
    """Devices by id. ``owned_between`` (first, last userId): most of them are owned by users
    in that range (a batch of users contiguous in userId order, as the backfill walks them), so
    they are read with one range read of the owner index, and only the rest by id (devices of
    a user owned by another, or by nobody yet). On the embedded server one $in of 500 ids costs
    about 0.4 ms per id (README); the range read costs a fraction, and is one command where
    ids are read in chunks of 500."""
    wanted = set(ids)
    found: dict[str, dict[str, Any]] = {}
    if owned_between is not None and wanted:
        first, last = owned_between
        owned = db[USER_METRICS].find(
            {"ownerUserId": {"$gte": first, "$lte": last}},
            session=session,
            batch_size=len(wanted) + 1,  # all of them in the first batch: no getMore
        )
        async for device in owned:
            if device["_id"] in wanted:
                found[device["_id"]] = device
    rest = wanted - found.keys()
    return found | await find_by_ids(db[USER_METRICS], rest, session=session)


async def devices_of_user(
    db: Database, user_id: str, *, session: AsyncClientSession | None = None
) -> list[str]:
    """Every device on which the user has a bucket or which the user owns. Two indexed reads,
    not one ``$or``: the embedded server plans no ``$or`` and read every device."""
    found: set[str] = set()
    for field in ("userIds", "ownerUserId"):
        found.update(await db[USER_METRICS].distinct("_id", {field: user_id}, session=session))
    return sorted(found)


async def load_owners(
    db: Database, devices: Iterable[str], *, session: AsyncClientSession
) -> dict[str, str]:
    """The owner of each of these devices that has one."""
    found = await find_by_ids(
        db[USER_METRICS], devices, projection={"ownerUserId": 1}, session=session
    )
    return {d: str(doc["ownerUserId"]) for d, doc in found.items() if doc.get("ownerUserId")}


async def apply_events(
    db: Database,
    events: Sequence[AttributedEvent],
    *,
    owners: dict[str, str],
    session: AsyncClientSession,
) -> DeviceWrite:
    """One bulk write: every device's buckets, and the owner of devices that had none.
    ``owners``: the devices' owners before these events (``load_owners``)."""
    after = assign_owners(events, owners)
    new_owners = {d: u for d, u in after.items() if d not in owners}
    if events:
        await db[USER_METRICS].bulk_write(
            device_updates(events, new_owners), ordered=False, session=session
        )
    return DeviceWrite(owners=after, new_owners=new_owners)


def assign_owners(events: Sequence[AttributedEvent], known: dict[str, str]) -> dict[str, str]:
    """Each device's owner: the one it has, else the user whose authenticated event arrived
    first (I3: the server's arrival order, never the client's clock or id).

    A second user on an owned device is recorded, never merged: its events count only for
    itself, and the device's anonymous history stays with the owner.
    """
    owners = dict(known)
    noticed: set[tuple[str, str]] = set()
    for event in sorted(events, key=lambda e: e.arrival):
        if event.user_id is None:
            continue
        owner = owners.setdefault(event.device, event.user_id)
        if owner != event.user_id and (event.device, event.user_id) not in noticed:
            noticed.add((event.device, event.user_id))
            counters.SHARED_DEVICE.inc()
            log.warning(
                "user %s authenticated on device %s owned by user %s: recorded, not merged",
                event.user_id, event.device, owner,
            )  # fmt: skip
    return owners


def device_updates(
    events: Sequence[AttributedEvent], new_owners: dict[str, str]
) -> list[UpdateOne]:
    """One upsert per device: all its buckets' increments in a single update."""
    deltas: dict[str, dict[str | None, BucketDelta]] = defaultdict(lambda: defaultdict(BucketDelta))
    for event in events:
        deltas[event.device][event.user_id].add(
            event.event, seen_at(event.event, event.received_at)
        )
    now = datetime.now(UTC)
    updates = []
    for device, buckets in sorted(deltas.items()):
        operators = merge_operators(
            [d.update_operators(bucket_path(u)) for u, d in buckets.items()]
        )
        operators.setdefault("$set", {})["updatedAt"] = now
        if device in new_owners:
            operators["$set"] |= {"ownerUserId": new_owners[device], "ownedSince": now}
        user_ids = sorted(u for u in buckets if u)
        if user_ids:
            operators["$addToSet"]["userIds"] = {"$each": user_ids}
        operators["$setOnInsert"] = {"createdAt": now}
        updates.append(UpdateOne({"_id": device}, operators, upsert=True))
    return updates
