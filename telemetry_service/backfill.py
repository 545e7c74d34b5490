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

A batch costs a constant number of commands: list the entries (they are also the fold's input),
read their devices (one range read of their owners; by id only those owned by others), read the
versions, one bulk write, one bulk publish, one marker update, the commit: seven in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
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
from telemetry_service.identity.store import entries_after
from telemetry_service.projection.writer import load_inputs, write_projections
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)

MARKER = "username_metrics_backfill"
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
        if not await self._acquire():
            return False
        await self._run()
        return True

    async def _acquire(self) -> bool:
        now = datetime.now(UTC)
        lease = now + timedelta(seconds=self.settings.backfill_lease_seconds)
        first_time = {"status": "pending", "lastUserId": None, "batches": 0, "users": 0}
        # Another replica may create the marker at the same moment: then it simply exists.
        with contextlib.suppress(DuplicateKeyError):
            await self.marker.update_one(
                {"_id": MARKER}, {"$setOnInsert": {**first_time, "createdAt": now}}, upsert=True
            )
        taken = await self.marker.find_one_and_update(
            {
                "_id": MARKER,
                "status": {"$in": ["pending", "running"]},
                "$or": [{"leaseUntil": None}, {"leaseUntil": {"$lte": now}}],
            },
            {"$set": {"status": "running", "leaseOwner": self.owner, "leaseUntil": lease}},
            return_document=ReturnDocument.AFTER,
        )
        return taken is not None

    async def _run(self) -> None:
        marker = await self.status()
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
        while (done := await self._apply_next(after)) is not None:
            after, count = done
            progress.done += count
            PROGRESS.set(min(progress.done / max(total, 1), 1.0))
            failpoints.hit(AFTER_BATCH)
            if time.monotonic() - last_report >= self.settings.backfill_progress_seconds:
                log.info(progress.line())
                last_report = time.monotonic()
            await asyncio.sleep(0)  # let the service's own work interleave
        await self._finish()
        PROGRESS.set(1.0)
        log.info("backfill done: %s", progress.line())

    async def _apply_next(self, after: str | None) -> tuple[str, int] | None:
        """Re-project the next batch of users after ``after``, in one transaction that also
        reads them. Returns the last userId done and how many, or None at the end."""
        db = self.runtime.db
        size = self.settings.backfill_batch_size

        async def work(session: AsyncClientSession) -> tuple[str, int] | None:
            batch = await entries_after(db, after, limit=size, session=session)
            if not batch:
                return None
            entries = {entry["_id"]: entry for entry in batch}
            user_ids = sorted(entries)
            inputs = await load_inputs(
                db, user_ids, session=session, entries=entries,
                owned_between=(user_ids[0], user_ids[-1]),
            )  # fmt: skip
            await write_projections(
                db=db,
                refreshes=self.runtime.refreshes,
                reasons=dict.fromkeys(user_ids, "backfill"),
                session=session,
                inputs=inputs,
            )
            await self._record(user_ids, session)
            return user_ids[-1], len(user_ids)

        done = await in_transaction(self.runtime.client, work)
        if done is not None:
            BATCHES.inc()
            USERS.inc(done[1])
        return done

    async def _record(self, user_ids: list[str], session: AsyncClientSession) -> None:
        lease = datetime.now(UTC) + timedelta(seconds=self.settings.backfill_lease_seconds)
        result = await self.marker.update_one(
            {"_id": MARKER, "leaseOwner": self.owner, "status": "running"},
            {
                "$set": {"lastUserId": user_ids[-1], "leaseUntil": lease},
                "$inc": {"batches": 1, "users": len(user_ids)},
            },
            session=session,
        )
        if result.modified_count != 1:
            raise LeaseLost("another replica owns the backfill now")

    async def _finish(self) -> None:
        await self.marker.update_one(
            {"_id": MARKER, "leaseOwner": self.owner},
            {"$set": {"status": "done", "finishedAt": datetime.now(UTC), "leaseUntil": None}},
        )
