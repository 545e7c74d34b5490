"""The one-time upgrade from the username-keyed layout to the userId-keyed one.

Before: ``identity_map`` and ``username_metrics`` had ``_id`` = username and a ``userId`` field;
``known_users`` counted renames per user in ``renameSeq``. After: both are keyed by userId with
the name as a unique attribute, and ``known_users.nameSeq`` holds the app's name clock (which
the app starts above every old ``renameSeq``).

It runs before any worker of this process starts (workers.py), batch by batch, each batch ONE
transaction that reads the old documents it converts and deletes them: a user's entry lists the
devices holding its buckets or owned by it (``user_metrics`` is keyed by userId and was never
wrong; the old entries' device lists could be), its name comes from ``known_users``, its
projection is rewritten through the projection writer (publishing its refresh) at a version
above every old one, so the app's scores move forward (I9). Known users the old layout left
without any entry are converted too. Progress is the data itself: what is converted is gone
(or, for those users, has an entry), so a crash resumes where it stopped and nothing is done
twice, and replicas running it at once conflict on the same documents and retry, rather than
needing a lease. A marker in
``migrations`` makes later start-ups skip it with one read.
"""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from typing import Any, Final

from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts import mongo
from shared_contracts.mongo import in_transaction
from telemetry_service.collections import (
    IDENTITY_MAP,
    KNOWN_USERS,
    MIGRATIONS,
    USERNAME_METRICS,
    find_by_ids,
)
from telemetry_service.devices.store import devices_of_user
from telemetry_service.identity.store import bind_devices, claim_name
from telemetry_service.projection.writer import adopt_legacy_projections, write_projections
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)

MARKER: Final = "identity_by_user_id"
#: Old documents carry userId as a field; current ones are keyed by it.
LEGACY: Final = {"userId": {"$exists": True}}


class IdentityUpgrade:
    def __init__(self, runtime: TelemetryRuntime, *, batch_size: int = 200) -> None:
        self.runtime = runtime
        self.db = runtime.db
        self.batch_size = batch_size

    async def run(self) -> int:
        """Convert everything old; returns the number of users converted (0 if none)."""
        if await self.db[MIGRATIONS].find_one({"_id": MARKER, "status": "done"}):
            return 0
        await mongo.update_all(
            self.db[KNOWN_USERS],
            {"renameSeq": {"$exists": True}},
            {"$rename": {"renameSeq": "nameSeq"}},
        )
        await self._retire_refreshes_by_username()
        converted = 0
        while count := await in_transaction(self.runtime.client, self._convert_entries):
            converted += count
        while count := await in_transaction(self.runtime.client, self._convert_projections):
            converted += count
        after: str | None = None
        while page := await in_transaction(
            self.runtime.client, functools.partial(self._convert_users_without_entry, after=after)
        ):
            after, count = page
            converted += count
        await self.db[MIGRATIONS].update_one(
            {"_id": MARKER},
            {
                "$set": {"status": "done", "finishedAt": datetime.now(UTC)},
                "$inc": {"users": converted},
            },
            upsert=True,
        )
        if converted:
            log.info("identity upgrade: %d users now keyed by userId", converted)
        return converted

    async def _retire_refreshes_by_username(self) -> None:
        """Our own outgoing score_refresh v1 messages still waiting name only a username; the
        app reads v2 only. Every user they could concern is re-projected below (publishing a
        v2 refresh), so they are finished as superseded instead of dying in the app."""
        now = datetime.now(UTC)
        retired = await mongo.update_all(
            self.runtime.refreshes.collection,
            {"type": "score_refresh", "schemaVersion": 1, "status": {"$in": ["pending", "dead"]}},
            {"$set": {"status": "done", "doneAt": now, "supersededAt": now, "updatedAt": now}},
        )
        if retired:
            log.info("identity upgrade: %d v1 score refreshes superseded", retired)

    async def _convert_entries(self, session: AsyncClientSession) -> int:
        """The next old identity entries' users. Their old entries go; what they listed does
        not decide anything: the old rename race could hand an entry, devices and all, to the
        next holder of its name. A user's devices are where its buckets are (user_metrics)."""
        first = await self.db[IDENTITY_MAP].find(
            LEGACY, {"userId": 1}, sort=[("_id", 1)], limit=self.batch_size, session=session
        ).to_list()  # fmt: skip
        if not first:
            return 0
        users = sorted({str(entry["userId"]) for entry in first})
        await self.db[IDENTITY_MAP].delete_many({"userId": {"$in": users}}, session=session)
        await self._convert(set(users), session)
        return len(users)

    async def _convert_projections(self, session: AsyncClientSession) -> int:
        """Old projections whose users had no old identity entry left."""
        old = await self.db[USERNAME_METRICS].find(
            LEGACY, {"userId": 1}, limit=self.batch_size, session=session
        ).to_list()  # fmt: skip
        users = {str(doc["userId"]) for doc in old}
        await self._convert(users, session)
        return len(users)

    async def _convert_users_without_entry(
        self, session: AsyncClientSession, *, after: str | None
    ) -> tuple[str, int] | None:
        """Known users the old layout left without any entry (theirs was handed away)."""
        query = {"_id": {"$gt": after}} if after is not None else {}
        page = await self.db[KNOWN_USERS].find(
            query, {"_id": 1}, sort=[("_id", 1)], limit=self.batch_size, session=session
        ).to_list()  # fmt: skip
        if not page:
            return None
        ids = [str(doc["_id"]) for doc in page]
        entered = await find_by_ids(self.db[IDENTITY_MAP], ids, session=session)
        missing = {user for user in ids if user not in entered}
        await self._convert(missing, session)
        return ids[-1], len(missing)

    async def _convert(self, users: set[str], session: AsyncClientSession) -> None:
        """Names from known_users, entries from the users' buckets, projections rewritten.
        A user whose name another one takes here is converted with them (its entry, created
        nameless by the eviction, would otherwise look converted)."""
        changed = set(users)
        known = await find_by_ids(self.db[KNOWN_USERS], users, session=session)
        for user_id in sorted(users):
            if name := known.get(user_id, {}).get("username"):
                seq = int(known[user_id].get("nameSeq", 0))
                changed |= await claim_name(
                    self.db, user_id=user_id, username=name, seq=seq, session=session
                )
        await bind_devices(
            self.db,
            {user: await devices_of_user(self.db, user, session=session) for user in changed},
            session=session,
        )
        await self._reproject(changed, session)

    async def _reproject(self, users: set[str], session: AsyncClientSession) -> None:
        versions = await adopt_legacy_projections(self.db, users, session=session)
        await write_projections(
            db=self.db,
            refreshes=self.runtime.refreshes,
            reasons=dict.fromkeys(users, "identity_migration"),
            session=session,
            legacy_versions=versions,
        )


async def legacy_layout(db: Any) -> bool:
    """Whether any old document is left (tests and the upgrade's own check)."""
    return bool(
        await db[IDENTITY_MAP].find_one(LEGACY) or await db[USERNAME_METRICS].find_one(LEGACY)
    )
