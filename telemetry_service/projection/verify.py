"""I4 at rest: username_metrics[u] equals the fold of its devices. Reports every drift."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from telemetry_service.collections import IDENTITY_MAP, USERNAME_METRICS
from telemetry_service.projection.fold import folded_part
from telemetry_service.projection.writer import load_inputs

Database = AsyncDatabase[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Drift:
    username: str
    problem: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        detail = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.username}: {self.problem}{detail}"


async def usernames_in_batches(db: Database, size: int) -> AsyncIterator[list[str]]:
    batch: list[str] = []
    async for entry in db[IDENTITY_MAP].find({}, {"_id": 1}, sort=[("_id", 1)]):
        batch.append(entry["_id"])
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def find_drift(db: Database, *, batch_size: int = 500) -> list[Drift]:
    drifts: list[Drift] = []
    mapped: set[str] = set()
    async for usernames in usernames_in_batches(db, batch_size):
        mapped.update(usernames)
        inputs = await load_inputs(db, usernames)
        stored = {d["_id"]: d async for d in db[USERNAME_METRICS].find({"_id": {"$in": usernames}})}
        for username in usernames:
            if username not in stored:
                drifts.append(Drift(username, "no projection"))
                continue
            expected = folded_part(inputs.fold(username))
            actual = folded_part(stored[username])
            if expected != actual:
                differing = tuple(k for k in expected if expected[k] != actual[k])
                drifts.append(Drift(username, "projection differs from the fold", differing))
    async for projection in db[USERNAME_METRICS].find({}, {"_id": 1}):
        if projection["_id"] not in mapped:
            drifts.append(Drift(projection["_id"], "projection without an identity_map entry"))
    return drifts
