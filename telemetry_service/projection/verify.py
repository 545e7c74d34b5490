"""I4 at rest, checked: every user's projection equals the fold of its devices, its identity
entry, ``known_users`` and its projection agree on its current name, and every device holding
one of its buckets (or owned by it) is in its entry. Also lists what needs an operator: events
set aside, events an older release kept aside and this one has not adopted, events whose key
counted as no key, dead queue messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from telemetry_service.collections import (
    EVENTS,
    KNOWN_USERS,
    USER_METRICS,
    USERNAME_METRICS,
    Database,
    find_by_ids,
)
from telemetry_service.identity.store import entries_after
from telemetry_service.processing.set_aside import count_set_aside
from telemetry_service.projection.fold import folded_part
from telemetry_service.projection.writer import load_inputs


@dataclass(frozen=True, slots=True)
class Drift:
    user_id: str
    problem: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        detail = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.user_id}: {self.problem}{detail}"


@dataclass(slots=True)
class VerifyReport:
    drift: list[Drift] = field(default_factory=list)
    set_aside_events: int = 0
    #: Events an older release kept aside in ``events`` after this release's last start: its
    #: watchers ran on after the upgrade (README); ``swamp-club events adopt`` adopts them.
    not_adopted_events: int = 0
    #: Events applied as anonymous although they carried a key, by reason (revoked, unknown).
    unattributed_events: dict[str, int] = field(default_factory=dict)
    dead_messages: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """Unattributed events are information (a revoked key is normal), not a fault."""
        return (
            not self.drift
            and not self.set_aside_events
            and not self.not_adopted_events
            and not any(self.dead_messages.values())
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "drift": [str(d) for d in self.drift],
            "setAsideEvents": self.set_aside_events,
            "notAdoptedEvents": self.not_adopted_events,
            "unattributedEvents": self.unattributed_events,
            "deadMessages": self.dead_messages,
        }


async def find_drift(db: Database, *, batch_size: int = 500) -> list[Drift]:
    drifts: list[Drift] = []
    mapped: set[str] = set()
    after: str | None = None
    while batch := await entries_after(db, after, limit=batch_size):
        after = batch[-1]["_id"]
        entries = {entry["_id"]: entry for entry in batch}
        mapped.update(entries)
        drifts += await _check_users(db, entries)
    async for projection in db[USERNAME_METRICS].find({}, {"_id": 1}):
        if projection["_id"] not in mapped:
            drifts.append(Drift(str(projection["_id"]), "projection without an identity entry"))
    return drifts


async def _check_users(db: Database, entries: dict[str, dict[str, Any]]) -> list[Drift]:
    user_ids = sorted(entries)
    inputs = await load_inputs(db, user_ids, entries=entries)
    stored = await find_by_ids(db[USERNAME_METRICS], user_ids)
    known = await find_by_ids(db[KNOWN_USERS], user_ids)
    holders = await _devices_holding(db, user_ids)
    drifts: list[Drift] = []
    for user_id in user_ids:
        if user_id not in stored:
            drifts.append(Drift(user_id, "no projection"))
            continue
        expected = folded_part(inputs.fold(user_id))
        actual = folded_part(stored[user_id])
        if expected != actual:
            differing = tuple(k for k in expected if expected[k] != actual[k])
            drifts.append(Drift(user_id, "projection differs from the fold", differing))
        names = (
            entries[user_id].get("username"),
            known.get(user_id, {}).get("username"),
            stored[user_id].get("username"),
        )
        if len(set(names)) != 1:
            drifts.append(Drift(user_id, "names disagree (identity, known_users, projection)"))
        missing = holders.get(user_id, set()) - set(entries[user_id].get("distinctIds", []))
        if missing:
            drifts.append(Drift(user_id, "devices with its buckets missing from its entry"))
    return drifts


async def _devices_holding(db: Database, user_ids: list[str]) -> dict[str, set[str]]:
    """userId -> the devices holding its bucket or owned by it (both fields are indexed)."""
    holders: dict[str, set[str]] = {}
    wanted = set(user_ids)
    cursor = db[USER_METRICS].find(
        {"$or": [{"userIds": {"$in": user_ids}}, {"ownerUserId": {"$in": user_ids}}]},
        {"userIds": 1, "ownerUserId": 1},
    )
    async for device in cursor:
        for user_id in {*device.get("userIds", []), device.get("ownerUserId")} & wanted:
            holders.setdefault(str(user_id), set()).add(device["_id"])
    return holders


async def verify(db: Database, bus: Database) -> VerifyReport:
    report = VerifyReport(drift=await find_drift(db))
    report.set_aside_events = await count_set_aside(db)
    report.not_adopted_events = await db[EVENTS].count_documents({"processed": False})
    for reason in ("revoked", "unknown"):
        if count := await db[EVENTS].count_documents({"unattributed": reason}):
            report.unattributed_events[reason] = count
    for queue in (TELEMETRY_COMMANDS, SWAMP_CLUB_EVENTS):
        report.dead_messages[queue] = await bus[queue].count_documents({"status": "dead"})
    return report
