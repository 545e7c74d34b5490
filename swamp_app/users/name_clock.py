"""The name clock: one counter for every name assignment (registration or rename).

Each assignment increments it in the assignment's own transaction, so two assignments that
touch the same name commit in clock order (both write this document: the later one conflicts
and retries with a higher value). Telemetry compares these values across users to know who
holds a contested name (SPEC I6); per user they increase too, which makes a stale
``username_changed`` recognisable.
"""

from __future__ import annotations

from typing import Any, Final

from pymongo import DESCENDING, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.messages import UsernameChanged
from swamp_app.collections import COUNTERS, USERS
from swamp_app.runtime import AppRuntime

NAME_CLOCK: Final = "name_clock"


async def next_name_seq(
    db: AsyncDatabase[dict[str, Any]], *, session: AsyncClientSession, tries: int = 5
) -> int:
    # The embedded server very rarely answers an applied increment with no document
    # (tests/test_embedded_gaps.py): take the next value; a skipped one is harmless.
    for _ in range(tries):
        clock = await db[COUNTERS].find_one_and_update(
            {"_id": NAME_CLOCK},
            {"$inc": {"value": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        if clock is not None:
            return int(clock["value"])
    raise RuntimeError(f"the name clock answered nothing {tries} times")


async def ensure_name_clock(runtime: AppRuntime, *, batch_size: int = 500) -> int:
    """Start the clock, once per deployment, above every per-user ``renameSeq`` of the release
    before it, and re-assert every user's current name on it.

    Why re-assert: commands the old release published carry per-user counters, which say
    nothing about the order of two users' claims on one name, so telemetry may apply them in
    an order that leaves a user nameless. A ``username_changed`` with the current name and a
    clock value for every user (all newer than any old command) makes telemetry converge to
    the app's names whatever order the old ones arrive in. Published before the clock document
    exists: a crash in between re-publishes them all next time, which changes nothing.
    Returns the number of names re-asserted (0 when the clock already runs)."""
    db = runtime.db
    if await db[COUNTERS].find_one({"_id": NAME_CLOCK}) is not None:
        return 0
    newest = await db[USERS].find_one(
        {"renameSeq": {"$exists": True}}, {"renameSeq": 1}, sort=[("renameSeq", DESCENDING)]
    )
    seq = int((newest or {}).get("renameSeq", 0))
    reasserted = 0
    after: str | None = None
    while page := await db[USERS].find(
        {"_id": {"$gt": after}} if after else {}, {"username": 1}, sort=[("_id", 1)],
        limit=batch_size,
    ).to_list():  # fmt: skip
        commands = [
            UsernameChanged(
                oldUsername=user["username"],
                newUsername=user["username"],
                userId=user["_id"],
                seq=seq + i + 1,
            )
            for i, user in enumerate(page)
        ]
        await runtime.commands.publish_many(commands)
        seq += len(page)
        reasserted += len(page)
        after = page[-1]["_id"]
    await db[COUNTERS].update_one({"_id": NAME_CLOCK}, {"$max": {"value": seq}}, upsert=True)
    return reasserted
