"""The consumer of telemetry_commands: each command's effects and its ack in one transaction."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.messages import ApiKeyIssued, ApiKeyRevoked, Message, UserRegistered
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.consumer import Consumer, Delivery
from telemetry_service.collections import IDENTITY_MAP, KNOWN_KEYS, KNOWN_USERS, USER_METRICS
from telemetry_service.consumers.identity_migration import apply_username_changed
from telemetry_service.projection.writer import write_projections
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)

Handler = Callable[[TelemetryRuntime, AsyncClientSession, Any], Awaitable[None]]


async def apply_user_registered(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: UserRegistered
) -> None:
    """Know the user, bind any devices it already has buckets on, project it (zeros if none)."""
    db = runtime.db
    known = await db[KNOWN_USERS].find_one_and_update(
        {"_id": command.userId},
        # setOnInsert: a redelivered registration must not undo a later rename.
        {"$setOnInsert": {"username": command.username, "registeredAt": datetime.now(UTC)}},
        upsert=True,
        return_document=ReturnDocument.AFTER,
        session=session,
    )
    assert known is not None  # an upsert returning the document after always finds one
    username = str(known["username"])
    devices = await db[USER_METRICS].distinct(
        "_id",
        {"$or": [{"userIds": command.userId}, {"ownerUserId": command.userId}]},
        session=session,
    )
    await db[IDENTITY_MAP].update_one(
        {"_id": username},
        {
            "$set": {"userId": command.userId},
            "$addToSet": {"distinctIds": {"$each": sorted(devices)}},
        },
        upsert=True,
        session=session,
    )
    await write_projections(
        db=db, refreshes=runtime.refreshes, reasons={username: "binding"}, session=session
    )


async def apply_api_key_issued(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: ApiKeyIssued
) -> None:
    # Never touches revokedAt: if the revoke overtook the issue, the key stays revoked.
    await runtime.db[KNOWN_KEYS].update_one(
        {"_id": command.keyHash},
        {"$set": {"userId": command.userId}, "$setOnInsert": {"issuedAt": datetime.now(UTC)}},
        upsert=True,
        session=session,
    )


async def apply_api_key_revoked(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: ApiKeyRevoked
) -> None:
    # An upsert: a revoke that arrives before its issue leaves a tombstone the issue respects.
    await runtime.db[KNOWN_KEYS].update_one(
        {"_id": command.keyHash},
        {"$set": {"revokedAt": datetime.now(UTC)}},
        upsert=True,
        session=session,
    )


HANDLERS: dict[str, Handler] = {
    "user_registered": apply_user_registered,
    "api_key_issued": apply_api_key_issued,
    "api_key_revoked": apply_api_key_revoked,
    "username_changed": apply_username_changed,
}


def command_consumer(runtime: TelemetryRuntime, *, worker: str | None = None) -> Consumer:
    async def handle(delivery: Delivery) -> None:
        message: Message = delivery.message
        handler = HANDLERS[message.type]

        async def effects_and_ack(session: AsyncClientSession) -> None:
            await handler(runtime, session, message)
            await delivery.ack(session=session)

        await in_transaction(runtime.client, effects_and_ack)

    return Consumer(runtime.commands, handle, worker=worker)
