"""API keys as telemetry knows them (replicated from the app as hashes only), and how an
event's key is resolved when the event is applied, not when it arrives (I10)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from pymongo.asynchronous.client_session import AsyncClientSession

from telemetry_service.collections import KNOWN_KEYS, Database, find_by_ids
from telemetry_service.identity.models import KnownKey


async def record_key_issued(
    db: Database, *, key_hash: str, user_id: str, session: AsyncClientSession
) -> None:
    # Never touches revokedAt: if the revoke overtook the issue, the key stays revoked.
    await db[KNOWN_KEYS].update_one(
        {"_id": key_hash},
        {"$set": {"userId": user_id}, "$setOnInsert": {"issuedAt": datetime.now(UTC)}},
        upsert=True,
        session=session,
    )


async def record_key_revoked(db: Database, *, key_hash: str, session: AsyncClientSession) -> None:
    # An upsert: a revoke that arrives before its issue leaves a tombstone the issue respects.
    await db[KNOWN_KEYS].update_one(
        {"_id": key_hash},
        {"$set": {"revokedAt": datetime.now(UTC)}},
        upsert=True,
        session=session,
    )


async def known_keys(
    db: Database, hashes: Iterable[str], *, session: AsyncClientSession | None = None
) -> dict[str, KnownKey]:
    """The keys we know among ``hashes``; a hash missing from the result is not known yet."""
    found = await find_by_ids(db[KNOWN_KEYS], hashes, session=session)
    return {h: KnownKey.from_document(doc) for h, doc in found.items()}
