"""The one writer of username_metrics (I1): every projection write publishes its score_refresh
in the same transaction, so no path can change a projection and forget to re-score the user.

A batch of usernames costs a constant number of commands: read their identity entries, read all
their devices with one $in, read the current versions, one bulk write, one bulk publish.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import DeleteOne, ReplaceOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.messages import RefreshReason, ScoreRefresh
from shared_contracts.queue.engine import Queue
from telemetry_service import counters
from telemetry_service.collections import (
    IDENTITY_MAP,
    USER_METRICS,
    USERNAME_METRICS,
    find_by_ids,
)
from telemetry_service.projection.fold import fold

Database = AsyncDatabase[dict[str, Any]]
Session = AsyncClientSession | None


@dataclass(frozen=True, slots=True)
class ProjectionInputs:
    """What the fold needs for some usernames: identity entries and their devices."""

    entries: dict[str, dict[str, Any]]
    devices: dict[str, dict[str, Any]]

    def fold(self, username: str) -> dict[str, Any]:
        entry = self.entries[username]
        ids = entry.get("distinctIds", [])
        return fold(str(entry["userId"]), (self.devices[d] for d in ids if d in self.devices), ids)


async def load_inputs(
    db: Database,
    usernames: list[str],
    *,
    session: Session = None,
    entries: dict[str, dict[str, Any]] | None = None,
) -> ProjectionInputs:
    """Identity entries (unless the caller already read them) and all their devices."""
    if entries is None:
        entries = await find_by_ids(db[IDENTITY_MAP], usernames, session=session)
    device_ids = {d for entry in entries.values() for d in entry.get("distinctIds", [])}
    devices = await find_by_ids(db[USER_METRICS], device_ids, session=session)
    return ProjectionInputs(entries=entries, devices=devices)


async def write_projections(
    *,
    db: Database,
    refreshes: Queue,
    reasons: Mapping[str, RefreshReason],
    session: Session,
    inputs: ProjectionInputs | None = None,
    version_floors: Mapping[str, int] | None = None,
    events_received_at: datetime | None = None,
) -> int:
    """Recompute and write the projection of each username, publishing each one's refresh.

    Usernames without an identity entry have nothing to project and are skipped.
    ``version_floors`` keeps versions monotonic per user across a rename: the new name's first
    projection must be newer than anything the app applied under the old name (I9).
    ``events_received_at`` (the newest event behind an ingest write) lets the app measure the
    lag from event receipt to score applied.
    Returns the number of projections written.
    """
    usernames = sorted(reasons)
    if not usernames:
        return 0
    inputs = inputs or await load_inputs(db, usernames, session=session)
    stored = await find_by_ids(
        db[USERNAME_METRICS], usernames, projection={"projectionVersion": 1}, session=session
    )
    versions = {u: int(doc.get("projectionVersion", 0)) for u, doc in stored.items()}
    now = datetime.now(UTC)
    writes: list[ReplaceOne[dict[str, Any]]] = []
    messages: list[ScoreRefresh] = []
    for username in usernames:
        if username not in inputs.entries:
            continue
        floor = (version_floors or {}).get(username, 0)
        version = max(versions.get(username, 0), floor) + 1
        projection = {
            "_id": username,
            **inputs.fold(username),
            "projectionVersion": version,
            "updatedAt": now,
        }
        if events_received_at is not None:
            projection["lastEventReceivedAt"] = events_received_at
        writes.append(ReplaceOne({"_id": username}, projection, upsert=True))
        snapshot = {k: v for k, v in projection.items() if k != "_id"} | {"username": username}
        messages.append(
            ScoreRefresh(
                username=username,
                reason=reasons[username],
                projectionVersion=version,
                snapshot=snapshot,
            )
        )
        counters.PROJECTION_WRITES.labels(reasons[username]).inc()
    if writes:
        await db[USERNAME_METRICS].bulk_write(writes, ordered=False, session=session)
        await refreshes.publish_many(messages, session=session)
    return len(writes)


async def delete_projections(*, db: Database, usernames: list[str], session: Session) -> None:
    """A username that no longer exists (renamed away) has no projection to refresh."""
    if usernames:
        await db[USERNAME_METRICS].bulk_write(
            [DeleteOne({"_id": u}) for u in usernames], session=session
        )


async def read_projection(
    db: Database, username: str, *, session: Session = None
) -> dict[str, Any] | None:
    return await db[USERNAME_METRICS].find_one({"_id": username}, session=session)
