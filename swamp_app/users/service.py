"""Registration, renames and deletion. Each commits the user, the score and the telemetry
commands in one transaction, or none of them (I5); the app never touches telemetry's database
(#211)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from shared_contracts import failpoints
from shared_contracts.messages import UsernameChanged, UserRegistered
from shared_contracts.mongo import in_transaction
from swamp_app.api_keys.service import issue_key, revoke_all_keys
from swamp_app.collections import LIVE_USER, USERS
from swamp_app.errors import NotFound, UsernameTaken
from swamp_app.runtime import AppRuntime
from swamp_app.scores.repository import create_score, delete_score, rekey_score
from swamp_app.users.name_clock import next_name_seq

#: Failpoint between the user update and the rest of a rename (the transaction must abort).
AFTER_USER_UPDATE = "app.after_user_update"


async def register_user(runtime: AppRuntime, *, username: str) -> tuple[dict[str, Any], str]:
    """A new user with its first API key (returned raw, once) and a zero score."""

    async def work(session: AsyncClientSession) -> tuple[dict[str, Any], str]:
        user_id = uuid.uuid4().hex
        seq = await next_name_seq(runtime.db, session=session)
        user: dict[str, Any] = {
            "_id": user_id,
            "username": username,
            "nameSeq": seq,
            "createdAt": datetime.now(UTC),
        }
        await runtime.db[USERS].insert_one(user, session=session)
        await create_score(runtime.db, user_id=user_id, username=username, session=session)
        await runtime.commands.publish(
            UserRegistered(userId=user_id, username=username, seq=seq), session=session
        )
        _, raw_key = await issue_key(runtime, user_id=user_id, session=session)
        return user, raw_key

    try:
        return await in_transaction(runtime.client, work)
    except DuplicateKeyError:
        raise UsernameTaken(f"the username {username!r} is taken") from None


async def rename_user(runtime: AppRuntime, *, user_id: str, new_username: str) -> dict[str, Any]:
    """Rename; the score is re-keyed and username_changed published in the same transaction."""

    async def work(session: AsyncClientSession) -> dict[str, Any]:
        current = await runtime.db[USERS].find_one({"_id": user_id, **LIVE_USER}, session=session)
        if current is None:
            raise NotFound("the user no longer exists")
        if current["username"] == new_username:
            return current  # renaming to one's own name changes nothing
        seq = await next_name_seq(runtime.db, session=session)
        renamed = await runtime.db[USERS].find_one_and_update(
            {"_id": user_id, "username": current["username"], **LIVE_USER},
            {"$set": {"username": new_username, "nameSeq": seq}},
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        assert renamed is not None  # matched by _id and username inside our snapshot
        failpoints.hit(AFTER_USER_UPDATE)
        await rekey_score(runtime.db, user_id=user_id, username=new_username, session=session)
        await runtime.commands.publish(
            UsernameChanged(
                oldUsername=current["username"],
                newUsername=new_username,
                userId=user_id,
                seq=seq,
            ),
            session=session,
        )
        return renamed

    try:
        return await in_transaction(runtime.client, work)
    except DuplicateKeyError:
        raise UsernameTaken(f"the username {new_username!r} is taken") from None


async def delete_user(runtime: AppRuntime, *, user_id: str) -> bool:
    """Delete an account in one transaction: the user becomes a tombstone, every live key is
    revoked (and telemetry told, so ingest rejects them), the score leaves the leaderboard.

    The tombstone keeps the username reserved: telemetry's history under that name must never
    be credited to a stranger who registers it later. Idempotent: False if already gone.
    """

    async def work(session: AsyncClientSession) -> bool:
        now = datetime.now(UTC)
        # Writing the user document makes a concurrent key issue or rename conflict with us,
        # so no key can be issued to a user that this deletion did not see.
        deleted = await runtime.db[USERS].find_one_and_update(
            {"_id": user_id, **LIVE_USER}, {"$set": {"deletedAt": now}}, session=session
        )
        if deleted is None:
            return False
        await revoke_all_keys(runtime, user_id=user_id, now=now, session=session)
        await delete_score(runtime.db, user_id=user_id, session=session)
        return True

    return await in_transaction(runtime.client, work)


async def find_user(runtime: AppRuntime, username: str) -> dict[str, Any]:
    user = await runtime.db[USERS].find_one({"username": username, **LIVE_USER})
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user
