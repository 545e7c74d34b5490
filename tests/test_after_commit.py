"""mongo.after_commit: follow-ups run once the transaction committed, only its last attempt's,
and a follow-up that fails does not fail the committed transaction's caller."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure, PyMongoError

from shared_contracts import mongo
from tests.support import DbNames


def write_conflict() -> PyMongoError:
    error = OperationFailure("write conflict", code=112)
    error._add_error_label("TransientTransactionError")
    return error


async def test_only_the_committed_attempt_s_follow_ups_run_after_its_commit(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> None:
    collection = mongo_client[db_names.telemetry]["after_commit"]
    ran: list[tuple[int, int]] = []
    attempts = 0

    async def work(session: AsyncClientSession) -> str:
        nonlocal attempts
        attempts += 1
        attempt = attempts
        await collection.insert_one({"attempt": attempt}, session=session)

        async def follow_up() -> None:  # sees the transaction's write committed
            ran.append((attempt, await collection.count_documents({})))

        assert mongo.after_commit(session, follow_up)
        assert ran == []
        if attempt == 1:
            raise write_conflict()  # with_transaction aborts it and runs work again
        return "done"

    assert await mongo.in_transaction(mongo_client, work) == "done"
    assert ran == [(2, 1)]


async def test_a_failing_follow_up_is_logged_and_the_caller_gets_its_result(
    mongo_client: AsyncMongoClient[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> None:
        raise write_conflict()

    async def work(session: AsyncClientSession) -> int:
        mongo.after_commit(session, fails)
        return 7

    assert await mongo.in_transaction(mongo_client, work) == 7
    assert "a follow-up of a committed transaction failed" in caplog.text


async def test_a_session_not_run_by_in_transaction_has_no_follow_ups(
    mongo_client: AsyncMongoClient[dict[str, Any]],
) -> None:
    async def nothing() -> None:
        raise AssertionError("never runs")

    async with mongo_client.start_session() as session:
        assert not mongo.after_commit(session, nothing)
