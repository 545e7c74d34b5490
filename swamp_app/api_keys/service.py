"""Issue, revoke and check API keys. Only the SHA-256 is stored; every issue and revoke
publishes its telemetry command in the same transaction."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.keys import api_key_hash
from shared_contracts.messages import ApiKeyIssued, ApiKeyRevoked
from shared_contracts.mongo import in_transaction
from swamp_app.collections import API_KEYS, LIVE_USER, USERS
from swamp_app.errors import NotFound
from swamp_app.runtime import AppRuntime

KEY_PREFIX = "swamp_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def issue_key(
    runtime: AppRuntime, *, user_id: str, session: AsyncClientSession
) -> tuple[dict[str, Any], str]:
    """Inside the caller's transaction. Returns the stored record and the raw key (shown once)."""
    raw = new_key()
    record = {
        "_id": uuid.uuid4().hex[:16],
        "userId": user_id,
        "keyHash": api_key_hash(raw),
        "createdAt": datetime.now(UTC),
        "revokedAt": None,
    }
    await runtime.db[API_KEYS].insert_one(record, session=session)
    await runtime.commands.publish(
        ApiKeyIssued(userId=user_id, keyHash=record["keyHash"]), session=session
    )
    return record, raw


async def issue_key_for(runtime: AppRuntime, *, user_id: str) -> tuple[dict[str, Any], str]:
    async def work(session: AsyncClientSession) -> tuple[dict[str, Any], str]:
        # Touch the live user inside the transaction: a concurrent deletion writes the same
        # document, so one of the two retries and sees the other (no key outlives its user).
        touched = await runtime.db[USERS].update_one(
            {"_id": user_id, **LIVE_USER},
            {"$set": {"keysChangedAt": datetime.now(UTC)}},
            session=session,
        )
        if touched.matched_count == 0:
            raise NotFound("the user no longer exists")
        return await issue_key(runtime, user_id=user_id, session=session)

    return await in_transaction(runtime.client, work)


async def revoke_key(runtime: AppRuntime, *, user_id: str, key_id: str) -> None:
    """Revoke one of the user's keys (idempotent); 404 for a key that is not theirs."""

    async def work(session: AsyncClientSession) -> None:
        record = await runtime.db[API_KEYS].find_one(
            {"_id": key_id, "userId": user_id}, session=session
        )
        if record is None:
            raise NotFound(f"no API key {key_id!r} for this user")
        if record.get("revokedAt") is not None:
            return
        await runtime.db[API_KEYS].update_one(
            {"_id": key_id}, {"$set": {"revokedAt": datetime.now(UTC)}}, session=session
        )
        await runtime.commands.publish(ApiKeyRevoked(keyHash=record["keyHash"]), session=session)

    await in_transaction(runtime.client, work)


async def revoke_all_keys(
    runtime: AppRuntime, *, user_id: str, now: datetime, session: AsyncClientSession
) -> int:
    """Inside the caller's transaction (account deletion): every live key of the user."""
    live = {"userId": user_id, "revokedAt": None}
    records = await runtime.db[API_KEYS].find(live, {"keyHash": 1}, session=session).to_list()
    if not records:
        return 0
    await runtime.db[API_KEYS].update_many(live, {"$set": {"revokedAt": now}}, session=session)
    await runtime.commands.publish_many(
        (ApiKeyRevoked(keyHash=r["keyHash"]) for r in records), session=session
    )
    return len(records)


async def user_for_key(runtime: AppRuntime, raw_key: str) -> dict[str, Any] | None:
    """The live user a live key belongs to. Looked up by hash: no secret is compared in our
    code."""
    record = await runtime.db[API_KEYS].find_one({"keyHash": api_key_hash(raw_key)})
    if record is None or record.get("revokedAt") is not None:
        return None
    return await runtime.db[USERS].find_one({"_id": record["userId"], **LIVE_USER})
