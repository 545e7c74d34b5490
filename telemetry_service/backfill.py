"""The one-time username_metrics backfill (#501), with the half the original forgot.

At start-up, unless the marker ``migrations/username_metrics_backfill`` says ``done``, one replica
(holding a lease on the marker) walks identity_map in userId order, batch by batch. Each batch is
ONE transaction that reads its identity entries and devices and writes their projections through
the projection writer, which publishes each score_refresh (reason ``backfill``) in that same
transaction (I1); the marker records the last finished userId. Reading inside the transaction
matters: when a write conflict makes the transaction run again, it folds what is there now,
never an older copy read before it (which would write an older fold at a higher version).
A crash resumes after the last committed batch, never redoing one (I7); a replica that lost the
lease cannot commit a batch.

Users are walked by pages of ids (one read per 50,000), each batch's entries read by id in its
transaction. A batch costs seven commands whatever its size: its entries, their devices (one
range read of their owners; by id only those owned by others), the versions, one bulk write,
one bulk publish, one marker update, the commit. A run adds four: the lease (which creates the
marker on a first run), the count for progress, the page of ids, the finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from prometheus_client import Counter, Gauge
from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from shared_contracts import failpoints
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.engine import LeaseLost
from telemetry_service.collections import IDENTITY_MAP, MIGRATIONS
from telemetry_service.identity.store import load_entries, user_ids_after
from telemetry_service.projection.writer import load_inputs, write_projections
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)

MARKER = "username_metrics_backfill"
#: userIds read per page (ids only); batches are cut from it.
ID_PAGE = 50_000
#: Failpoint after a batch committed (a crash mid-backfill).
AFTER_BATCH = "backfill.after_batch"
Status = Literal["pending", "running", "done"]

USERS = Counter("swamp_backfill_users_total", "Users whose projection the backfill recomputed")
BATCHES = Counter("swamp_backfill_batches_total", "Backfill batches committed")
PROGRESS = Gauge("swamp_backfill_progress_ratio", "Backfill progress, 0..1 (1 when done)")


@dataclass
class Progress:
    total: int
    done: int
    started: float

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return f"backfill {self.done}/{self.total} users, {rate:.0f}/s, ETA {eta}"


class Backfill:
    def __init__(self, runtime: TelemetryRuntime, *, owner: str | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.marker = runtime.db[MIGRATIONS]
        self.owner = owner or uuid.uuid4().hex[:12]

    async def status(self) -> dict[str, Any]:
        marker = await self.marker.find_one({"_id": MARKER})
        return marker or {"_id": MARKER, "status": "pending"}

    async def reset(self) -> None:
        """An operator's re-run: forget the progress; the next run walks everything again."""
        await self.marker.update_one(
            {"_id": MARKER},
            {
                "$set": {
                    "status": "pending",
                    "lastUserId": None,
                    "leaseUntil": None,
                    "batches": 0,
                    "users": 0,
                },
                "$unset": {"finishedAt": "", "lastUsername": "", "usernames": ""},
                "$inc": {"reruns": 1},
            },
            upsert=True,
        )

    async def run_in_background(self) -> None:
        """The start-up task: until the marker is done, take the lease when it is free and run.
        A replica that finds the lease held keeps checking, so it takes over if the holder dies."""
        while (await self.status()).get("status") != "done":
            try:
                if await self.run_if_needed():
                    return
            except LeaseLost:
                log.warning("backfill lease lost; another replica continues")
            except Exception:
                log.exception("backfill failed; it resumes from its last batch")
            await asyncio.sleep(self.settings.backfill_lease_seconds / 2)

    async def run_if_needed(self) -> bool:
        """Run to the end if the marker is not done and we win its lease. True if we finished."""
        marker = await self._acquire()
        if marker is None:
            return False
        await self._run(marker)
        return True

    async def _acquire(self) -> dict[str, Any] | None:
        """The marker, leased to us; None if it is done or another replica holds it. One
        command: the first run creates the marker by upserting it. A marker that exists but does
        not match (done, or leased) makes the upsert insert a second one with its _id, which the
        unique _id refuses: not taken (also when another replica creates it at the same moment)."""
        now = datetime.now(UTC)
        lease = now + timedelta(seconds=self.settings.backfill_lease_seconds)
        first_time = {"lastUserId": None, "batches": 0, "users": 0, "createdAt": now}
        try:
            return await self.marker.find_one_and_update(
                {
                    "_id": MARKER,
                    "status": {"$in": ["pending", "running"]},
                    "$or": [{"leaseUntil": None}, {"leaseUntil": {"$lte": now}}],
                },
                {
                    "$set": {"status": "running", "leaseOwner": self.owner, "leaseUntil": lease},
                    "$setOnInsert": first_time,
                },
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return None

    async def _run(self, marker: dict[str, Any]) -> None:
        total = await self.runtime.db[IDENTITY_MAP].count_documents({})
        # A marker left mid-way by the username-keyed layout (lastUsername) restarts from the
        # beginning: its position means nothing in userId order.
        after = marker.get("lastUserId")
        progress = Progress(
            total=total, done=int(marker.get("users", 0)) if after else 0, started=time.monotonic()
        )
        if after:
            log.info("backfill resumes after user %r (%d done)", after, progress.done)
        last_report = time.monotonic()
        async for user_ids in self._batches(after):
            progress.done += await self._apply(user_ids)
            PROGRESS.set(min(progress.done / max(total, 1), 1.0))
            failpoints.hit(AFTER_BATCH)
            if time.monotonic() - last_report >= self.settings.backfill_progress_seconds:
                log.info(progress.line())
                last_report = time.monotonic()
            await asyncio.sleep(0)  # let the service's own work interleave
        await self._finish()
        PROGRESS.set(1.0)
        log.info("backfill done: %s", progress.line())

    async def _batches(self, after: str | None) -> AsyncIterator[list[str]]:
        """The userIds after ``after`` in order, a batch at a time, read a page of ids at a
        time (one read per ``ID_PAGE`` users)."""
        size = self.settings.backfill_batch_size
        limit = max(ID_PAGE, size)
        while page := await user_ids_after(self.runtime.db, after, limit=limit):
            for start in range(0, len(page), size):
                yield page[start : start + size]
            if len(page) < limit:
                # The last page: a user created since is the watcher's to project (it publishes
                # its own refresh), so reading an empty page would only cost a command.
                return
            after = page[-1]

    async def _apply(self, user_ids: list[str]) -> int:
        """Re-project these users (consecutive in userId order) in one transaction that also
        reads their entries and devices. Returns how many had an entry (one deleted meanwhile
        has nothing to project)."""
        db = self.runtime.db

        async def work(session: AsyncClientSession) -> int:
            entries = await load_entries(db, user_ids, session=session)
            found = sorted(entries)
            inputs = await load_inputs(
                db, found, session=session, entries=entries,
                owned_between=(user_ids[0], user_ids[-1]),
            )  # fmt: skip
            await write_projections(
                db=db,
                refreshes=self.runtime.refreshes,
                reasons=dict.fromkeys(found, "backfill"),
                session=session,
                inputs=inputs,
            )
            await self._record(last=user_ids[-1], users=len(found), session=session)
            return len(found)

        done = await in_transaction(self.runtime.client, work)
        BATCHES.inc()
        USERS.inc(done)
        return done

    async def _record(self, *, last: str, users: int, session: AsyncClientSession) -> None:
        lease = datetime.now(UTC) + timedelta(seconds=self.settings.backfill_lease_seconds)
        result = await self.marker.update_one(
            {"_id": MARKER, "leaseOwner": self.owner, "status": "running"},
            {
                "$set": {"lastUserId": last, "leaseUntil": lease},
                "$inc": {"batches": 1, "users": users},
            },
            session=session,
        )
        if result.modified_count != 1:
            raise LeaseLost("another replica owns the backfill now")

    async def _finish(self) -> None:
        # Only the run it still is: an operator's reset after our last batch (status pending,
        # leaseOwner still ours) asked for a run from the start, which "done" would cancel.
        result = await self.marker.update_one(
            {"_id": MARKER, "leaseOwner": self.owner, "status": "running"},
            {"$set": {"status": "done", "finishedAt": datetime.now(UTC), "leaseUntil": None}},
        )
        if result.modified_count != 1:
            log.warning("backfill reset or taken over before it finished; not marked done")
