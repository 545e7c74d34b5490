"""The ingest watcher: applies batches of raw events exactly once (I2).

A batch is leased (several watcher replicas are safe), then applied in ONE transaction: device
buckets (one bulk write), device ownership (I3), identity_map, the projection of every affected
username through the projection writer (which publishes the refreshes, I1), and finally marking
the events processed, filtered on our claim token. If our lease was lost meanwhile, that last
step matches fewer events and the whole transaction aborts, so nothing is ever counted twice,
wherever a worker dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import PyMongoError

from shared_contracts import failpoints
from shared_contracts.messages import RefreshReason
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.documents import PARKED
from shared_contracts.queue.engine import LeaseLost
from shared_contracts.wakeup import Wakeup
from telemetry_service import counters
from telemetry_service.collections import (
    EVENTS,
    IDENTITY_MAP,
    KNOWN_USERS,
    USER_METRICS,
    find_by_ids,
)
from telemetry_service.ingest.schemas import CliEvent
from telemetry_service.processing.buckets import (
    BucketDelta,
    bucket_path,
    merge_operators,
    seen_at,
)
from telemetry_service.projection.writer import write_projections
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)

#: Failpoint names, in the order the batch passes them.
AFTER_METRICS_WRITE = "ingest.after_metrics_write"
BEFORE_MARK_PROCESSED = "ingest.before_mark_processed"
BEFORE_COMMIT = "ingest.before_commit"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: str
    event: CliEvent
    user_id: str | None
    received_at: datetime

    @property
    def device(self) -> str:
        return self.event.distinct_id

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> StoredEvent:
        return cls(
            id=document["_id"],
            event=CliEvent.model_validate(document["raw"]),
            user_id=document.get("userId"),
            received_at=document["receivedAt"],
        )


class IngestWatcher:
    def __init__(self, runtime: TelemetryRuntime, *, worker: str | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.events = runtime.db[EVENTS]
        self.refreshes = runtime.refreshes
        self.worker = worker or uuid.uuid4().hex[:8]
        self.wakeup = Wakeup(
            self.events,
            [{"$match": {"operationType": "insert"}}],
            poll_interval_seconds=self.settings.ingest_poll_interval_seconds,
            use_change_streams=self.settings.queue_change_streams,
        )
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.wakeup.set()

    async def run(self) -> None:
        watcher = asyncio.create_task(self.wakeup.watch_forever())
        try:
            while not self._stopping.is_set():
                self.wakeup.clear()
                try:
                    handled = await self.process_one_batch()
                except Exception:
                    log.exception("ingest batch failed; its events are retried after their lease")
                    counters.BATCHES.labels("failed").inc()
                    handled = 0
                if not handled:
                    await self.wakeup.wait()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def drain(self) -> int:
        """Apply batches until none is left (tests, the CLI, shutdown hooks)."""
        total = 0
        while handled := await self.process_one_batch():
            total += handled
        return total

    # --- one batch -----------------------------------------------------------------------

    async def claim_batch(self) -> tuple[str, list[dict[str, Any]]]:
        """Lease up to a batch of unprocessed events: three commands, whatever the batch size."""
        now = datetime.now(UTC)
        free = {"processed": False, "leaseUntil": {"$lte": now}}
        first = self.events.find(
            free, {"_id": 1}, sort=[("_id", 1)], limit=self.settings.ingest_batch_size
        )
        ids = [d["_id"] async for d in first]
        if not ids:
            return "", []
        token = uuid.uuid4().hex
        lease_until = now + timedelta(seconds=self.settings.ingest_lease_seconds)
        await self.events.update_many(
            {**free, "_id": {"$lte": ids[-1]}},
            {"$set": {"leaseUntil": lease_until, "claimToken": token}, "$inc": {"attempts": 1}},
        )
        claimed = await self.events.find({"claimToken": token, "processed": False}).to_list()
        return token, claimed

    async def process_one_batch(self) -> int:
        token, documents = await self.claim_batch()
        if not documents:
            return 0
        usable = await self._set_aside_exhausted(documents)
        if not usable:
            return len(documents)
        started = time.perf_counter()
        batch = [StoredEvent.from_document(d) for d in usable]

        async def apply(session: AsyncClientSession) -> None:
            await self.apply_batch(session, token, batch)

        try:
            await in_transaction(self.runtime.client, apply)
        except LeaseLost:
            counters.BATCHES.labels("lease_lost").inc()
            log.warning(
                "ingest batch of %d events: lease lost, another worker applies it", len(batch)
            )
            return len(documents)
        except PyMongoError as exc:
            await self._record_error(token, exc)
            raise
        counters.BATCHES.labels("applied").inc()
        counters.BATCH_SECONDS.observe(time.perf_counter() - started)
        counters.EVENTS_PROCESSED.inc(len(batch))
        return len(documents)

    async def _set_aside_exhausted(self, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events that failed max attempts wait (kept, never counted) for an operator's retry."""
        limit = self.settings.queue_max_attempts
        exhausted = {d["_id"] for d in documents if d.get("attempts", 0) > limit}
        if exhausted:
            await self.events.update_many(
                {"_id": {"$in": sorted(exhausted)}},
                {"$set": {"leaseUntil": PARKED, "dead": True}, "$unset": {"claimToken": ""}},
            )
            counters.EVENTS_DEAD.inc(len(exhausted))
            log.error("%d events set aside after %d failed attempts", len(exhausted), limit)
        return [d for d in documents if d["_id"] not in exhausted]

    async def _record_error(self, token: str, exc: BaseException) -> None:
        try:
            await self.events.update_many(
                {"claimToken": token, "processed": False},
                {"$set": {"lastError": f"{type(exc).__name__}: {exc}"[:1000]}},
            )
        except PyMongoError:
            log.exception("could not record the batch error")

    async def apply_batch(
        self, session: AsyncClientSession, token: str, batch: list[StoredEvent]
    ) -> None:
        db = self.runtime.db
        devices = await find_by_ids(
            db[USER_METRICS],
            {e.device for e in batch},
            projection={"ownerUserId": 1},
            session=session,
        )
        owners = assign_owners(batch, devices)
        user_ids = {e.user_id for e in batch if e.user_id} | set(owners.values())
        known = await find_by_ids(db[KNOWN_USERS], user_ids, session=session)
        usernames = {user_id: str(user["username"]) for user_id, user in known.items()}
        new_owners = {d: u for d, u in owners.items() if not devices.get(d, {}).get("ownerUserId")}
        await db[USER_METRICS].bulk_write(
            device_updates(batch, new_owners), ordered=False, session=session
        )
        failpoints.hit(AFTER_METRICS_WRITE)

        bindings = identity_bindings(batch, owners, usernames)
        if bindings:
            await db[IDENTITY_MAP].bulk_write(
                [
                    UpdateOne(
                        {"_id": name},
                        {
                            "$set": {"userId": uid},
                            "$addToSet": {"distinctIds": {"$each": sorted(ids)}},
                        },
                        upsert=True,
                    )
                    for name, (uid, ids) in sorted(bindings.items())
                ],
                ordered=False,
                session=session,
            )
        bound_users = set(new_owners.values())
        reasons: dict[str, RefreshReason] = {
            name: "binding" if uid in bound_users else "ingest"
            for name, (uid, _) in bindings.items()
        }
        await write_projections(
            db=db,
            refreshes=self.refreshes,
            reasons=reasons,
            session=session,
            events_received_at=max(e.received_at for e in batch),
        )
        failpoints.hit(BEFORE_MARK_PROCESSED)

        marked = await self.events.update_many(
            {"claimToken": token, "processed": False},
            {"$set": {"processed": True, "processedAt": datetime.now(UTC)}},
            session=session,
        )
        if marked.modified_count != len(batch):
            raise LeaseLost(f"{len(batch) - marked.modified_count} events were taken over")
        failpoints.hit(BEFORE_COMMIT)


def assign_owners(batch: list[StoredEvent], devices: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each device's owner: the one it has, else the first user who authenticated on it (I3).

    A second user on an owned device is recorded, never merged: its events count only for
    itself, and the device's anonymous history stays with the owner.
    """
    owners = {d: str(doc["ownerUserId"]) for d, doc in devices.items() if doc.get("ownerUserId")}
    noticed: set[tuple[str, str]] = set()
    for event in sorted(batch, key=lambda e: (seen_at(e.event, e.received_at), e.id)):
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


def device_updates(batch: list[StoredEvent], new_owners: dict[str, str]) -> list[UpdateOne]:
    """One upsert per device: all its buckets' increments in a single update."""
    deltas: dict[str, dict[str | None, BucketDelta]] = defaultdict(lambda: defaultdict(BucketDelta))
    for event in batch:
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


def identity_bindings(
    batch: list[StoredEvent], owners: dict[str, str], usernames: dict[str, str]
) -> dict[str, tuple[str, set[str]]]:
    """username -> (userId, devices to add): devices a user authenticated on or owns.

    Resolved through known_users at processing time, so an event sent with a key before a
    rename lands under the new name (I10). Every owner of a device in the batch is included,
    even for anonymous-only events: that is what re-scores a bound device's owner.
    """
    pairs = {(e.user_id, e.device) for e in batch if e.user_id}
    pairs |= {(owner, e.device) for e in batch if (owner := owners.get(e.device))}
    bindings: dict[str, tuple[str, set[str]]] = {}
    for user_id, device in pairs:
        username = usernames.get(user_id)
        if username is None:
            counters.UNKNOWN_USER.inc()
            continue  # bound when user_registered arrives
        bindings.setdefault(username, (user_id, set()))[1].add(device)
    return bindings
