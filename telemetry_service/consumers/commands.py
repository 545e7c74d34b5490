"""The consumer of telemetry_commands: each command's effects and its ack in one transaction.

The handlers orchestrate: identity/ decides whose name and keys change, the projection writer
re-projects every user whose name changed (publishing their refreshes, I1).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.messages import (
    ApiKeyIssued,
    ApiKeyRevoked,
    Message,
    UsernameChanged,
    UserRegistered,
)
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.consumer import Consumer, Delivery
from telemetry_service.identity.keys import record_key_issued, record_key_revoked
from telemetry_service.identity.store import assign_name, register_user
from telemetry_service.projection.writer import write_projections
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)

Handler = Callable[[TelemetryRuntime, AsyncClientSession, Any], Awaitable[None]]


async def apply_user_registered(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: UserRegistered
) -> None:
    """Know the user by name, bind devices it already has buckets on, project it (zeros if
    it has no events yet)."""
    changed = await register_user(
        runtime.db,
        user_id=command.userId,
        username=command.username,
        seq=command.seq,
        session=session,
    )
    await write_projections(
        db=runtime.db,
        refreshes=runtime.refreshes,
        reasons=dict.fromkeys(changed, "binding"),
        session=session,
    )


async def apply_username_changed(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: UsernameChanged
) -> None:
    """A state assignment (I6): the name moves, the user's data never does. A stale seq
    changes nothing."""
    changed = await assign_name(
        runtime.db,
        user_id=command.userId,
        username=command.newUsername,
        seq=command.seq,
        session=session,
    )
    if not changed:
        log.info("username_changed seq %d for %s is not newer: no-op", command.seq, command.userId)
    await write_projections(
        db=runtime.db,
        refreshes=runtime.refreshes,
        reasons=dict.fromkeys(changed, "identity_migration"),
        session=session,
    )


async def apply_api_key_issued(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: ApiKeyIssued
) -> None:
    await record_key_issued(
        runtime.db, key_hash=command.keyHash, user_id=command.userId, session=session
    )


async def apply_api_key_revoked(
    runtime: TelemetryRuntime, session: AsyncClientSession, command: ApiKeyRevoked
) -> None:
    await record_key_revoked(runtime.db, key_hash=command.keyHash, session=session)


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
