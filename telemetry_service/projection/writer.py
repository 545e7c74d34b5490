"""The one writer of username_metrics (I1): every projection write publishes its score_refresh
in the same transaction, so no path can change a projection and forget to re-score the user.

A projection is per userId (``_id``), with the user's current name as a unique attribute
(``username``, absent while the user has none here). Its ``projectionVersion`` counts per user,
so a rename never resets it (I9).

A batch of users costs a constant number of commands: read their identity entries, read all
their devices (bounded $in chunks, or a range of owners), read the current versions, one bulk
write, one bulk publish.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import ReplaceOne
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.messages import RefreshReason, ScoreRefresh
from shared_contracts.queue.engine import Queue
from telemetry_service import counters
from telemetry_service.collections import USERNAME_METRICS, Database, find_by_ids
from telemetry_service.devices.store import load_devices
from telemetry_service.identity.store import load_entries
from telemetry_service.projection.fold import fold

Session = AsyncClientSession | None
NOT_IN_SNAPSHOT = frozenset({"_id", "activeDayList", "distinctIds"})


@dataclass(frozen=True, slots=True)
class ProjectionInputs:
    """What the fold needs for some users: their identity entries and devices."""

    entries: dict[str, dict[str, Any]]
    devices: dict[str, dict[str, Any]]

    def fold(self, user_id: str) -> dict[str, Any]:
        ids = self.entries[user_id].get("distinctIds", [])
        return fold(user_id, (self.devices[d] for d in ids if d in self.devices), ids)

    def username(self, user_id: str) -> str | None:
        name = self.entries[user_id].get("username")
        return str(name) if name else None


async def load_inputs(
    db: Database,
    user_ids: Iterable[str],
    *,
    session: Session = None,
    entries: dict[str, dict[str, Any]] | None = None,
    owned_between: tuple[str, str] | None = None,
) -> ProjectionInputs:
    """Identity entries (unless the caller already read them) and all their devices;
    ``owned_between``: see ``load_devices``."""
    if entries is None:
        entries = await load_entries(db, user_ids, session=session)
    device_ids = {d for entry in entries.values() for d in entry.get("distinctIds", [])}
    devices = await load_devices(db, device_ids, owned_between=owned_between, session=session)
    return ProjectionInputs(entries=entries, devices=devices)


async def write_projections(
    *,
    db: Database,
    refreshes: Queue,
    reasons: Mapping[str, RefreshReason],
    session: AsyncClientSession,
    inputs: ProjectionInputs | None = None,
    legacy_versions: Mapping[str, int] | None = None,
    events_received_at: datetime | None = None,
    refreshes_not_before: Mapping[str, datetime] | None = None,
) -> int:
    """Recompute and write the projection of each userId in ``reasons``, publishing each one's
    refresh. Users without an identity entry have nothing to project and are skipped.

    ``legacy_versions`` is only for the upgrade from the username-keyed layout: the versions
    the app may already have applied, which the new projection must exceed (I9).
    ``events_received_at`` (the newest event behind an ingest write) lets the app measure the
    lag from event receipt to score applied. ``refreshes_not_before``: users whose refresh,
    if it is a new pending one, the app may claim only from then on (processing/bursts.py).
    Returns the number of projections written.
    """
    user_ids = sorted(reasons)
    if not user_ids:
        return 0
    inputs = inputs or await load_inputs(db, user_ids, session=session)
    stored = await find_by_ids(
        db[USERNAME_METRICS],
        user_ids,
        projection={"projectionVersion": 1, "username": 1},
        session=session,
    )
    await _release_changed_names(db, user_ids, inputs, stored, session)
    now = datetime.now(UTC)
    writes: list[ReplaceOne[dict[str, Any]]] = []
    messages: list[ScoreRefresh] = []
    for user_id in user_ids:
        if user_id not in inputs.entries:
            continue
        version = 1 + max(
            int(stored.get(user_id, {}).get("projectionVersion", 0)),
            (legacy_versions or {}).get(user_id, 0),
        )
        username = inputs.username(user_id)
        projection = {
            "_id": user_id,
            **({"username": username} if username else {}),
            **inputs.fold(user_id),
            "projectionVersion": version,
            "updatedAt": now,
        }
        if events_received_at is not None:
            projection["lastEventReceivedAt"] = events_received_at
        writes.append(ReplaceOne({"_id": user_id}, projection, upsert=True))
        # Bounded: the app scores from counts; the day list and device ids grow with a user's
        # history and would only carry device ids across the bus.
        snapshot = {k: v for k, v in projection.items() if k not in NOT_IN_SNAPSHOT}
        messages.append(
            ScoreRefresh(
                userId=user_id,
                username=username,
                reason=reasons[user_id],
                projectionVersion=version,
                snapshot=snapshot | {"userId": user_id, "username": username},
            )
        )
        counters.PROJECTION_WRITES.labels(reasons[user_id]).inc()
    if writes:
        await db[USERNAME_METRICS].bulk_write(writes, ordered=True, session=session)
        await _publish(refreshes, messages, refreshes_not_before or {}, session)
    return len(writes)


async def _publish(
    refreshes: Queue,
    messages: list[ScoreRefresh],
    not_before: Mapping[str, datetime],
    session: AsyncClientSession,
) -> None:
    """One bulk publish for the refreshes due at once, one for each later time (a burst's)."""
    by_time: dict[datetime | None, list[ScoreRefresh]] = defaultdict(list)
    for message in messages:
        by_time[not_before.get(message.userId)].append(message)
    for at, due in by_time.items():
        await refreshes.publish_many(due, session=session, not_before=at)


async def _release_changed_names(
    db: Database,
    user_ids: list[str],
    inputs: ProjectionInputs,
    stored: dict[str, dict[str, Any]],
    session: AsyncClientSession,
) -> None:
    """When names moved between these users (one took the other's), free the old names first:
    ``username`` is unique, and the replaces below would collide in any order."""
    changed = [
        u
        for u in user_ids
        if u in stored
        and stored[u].get("username")
        and (u not in inputs.entries or stored[u].get("username") != inputs.username(u))
    ]
    if changed:
        await db[USERNAME_METRICS].update_many(
            {"_id": {"$in": changed}}, {"$unset": {"username": ""}}, session=session
        )


async def adopt_legacy_projections(
    db: Database, user_ids: Iterable[str], *, session: AsyncClientSession
) -> dict[str, int]:
    """Upgrade only: remove the username-keyed projections of these users (they carry a
    ``userId`` field; current ones do not) and return each user's highest version among them,
    for ``write_projections(legacy_versions=...)`` in the same transaction."""
    legacy = await db[USERNAME_METRICS].find(
        {"userId": {"$in": sorted(set(user_ids))}}, {"userId": 1, "projectionVersion": 1},
        session=session,
    ).to_list()  # fmt: skip
    versions: dict[str, int] = {}
    for doc in legacy:
        user = str(doc["userId"])
        versions[user] = max(versions.get(user, 0), int(doc.get("projectionVersion", 0)))
    if legacy:
        await db[USERNAME_METRICS].delete_many(
            {"_id": {"$in": [doc["_id"] for doc in legacy]}}, session=session
        )
    return versions


async def read_projection(db: Database, *, username: str) -> dict[str, Any] | None:
    """The projection of the user who holds ``username`` now (the name is unique)."""
    return await db[USERNAME_METRICS].find_one({"username": username})
