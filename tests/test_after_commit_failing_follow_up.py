"""mongo.after_commit under a helper's attack: a follow-up that raises something other than a
PyMongoError (at e5257a1 it reached the caller, whose transaction had committed, and the
follow-ups after it never ran), and transactions nested in one another."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts import mongo
from tests.support import DbNames


async def test_a_follow_up_raising_a_non_driver_error_does_not_fail_the_committed_caller(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> None:
    """The transaction committed: its caller gets its result, and the follow-ups after the
    failing one run."""
    collection = mongo_client[db_names.telemetry]["after_commit_attack"]
    ran: list[str] = []

    async def fails() -> None:
        raise RuntimeError("a bug in a follow-up")

    async def second() -> None:
        ran.append("second")

    async def work(session: AsyncClientSession) -> int:
        await collection.insert_one({"_id": 1}, session=session)
        mongo.after_commit(session, fails)
        mongo.after_commit(session, second)
        return 7

    try:
        result = await mongo.in_transaction(mongo_client, work)
    except RuntimeError as exc:
        committed = await collection.count_documents({"_id": 1})
        pytest.fail(f"caller got {exc!r}; committed documents: {committed}; ran {ran}")
    assert result == 7
    assert ran == ["second"]


async def test_nested_in_transaction_follow_ups_run_after_their_own_commit(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> None:
    collection = mongo_client[db_names.telemetry]["after_commit_nested"]
    other = mongo_client[db_names.telemetry]["after_commit_nested_inner"]
    seen: list[tuple[str, int]] = []

    async def outer(session: AsyncClientSession) -> None:
        await collection.insert_one({"_id": "outer"}, session=session)

        async def inner(inner_session: AsyncClientSession) -> None:
            await other.insert_one({"_id": "inner"}, session=inner_session)

            async def after_inner() -> None:
                seen.append(("inner", await other.count_documents({})))

            assert mongo.after_commit(inner_session, after_inner)

        await mongo.in_transaction(mongo_client, inner)

        async def after_outer() -> None:
            both = await collection.count_documents({}) + await other.count_documents({})
            seen.append(("outer", both))

        assert mongo.after_commit(session, after_outer)  # still registered on the outer one

    await mongo.in_transaction(mongo_client, outer)
    assert seen == [("inner", 1), ("outer", 2)]
