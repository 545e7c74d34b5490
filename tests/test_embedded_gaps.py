"""Where the embedded server (SecantusDB 0.7.0b3) falls short of mongod: minimal tests, skipped
on it with the reason, run on a real MongoDB (MONGODB_URI). Our code stays correct on both."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import AsyncMongoClient

from tests.support import EMBEDDED, DbNames


@pytest.mark.skipif(
    EMBEDDED,
    reason="SecantusDB examines every matching index key before applying a limit (explain shows "
    "nReturned == matches for limit 1), so each claim costs O(pending). Correct, only slower: "
    "queue depth stays small in tests, and bench/ reports per-message costs.",
)
async def test_an_indexed_limit_one_query_examines_about_one_key(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> None:
    collection = mongo_client[db_names.bus]["limit_pushdown"]
    await collection.create_index([("status", 1), ("availableAt", 1)])
    await collection.insert_many([{"status": "pending", "availableAt": i} for i in range(500)])
    explained = await mongo_client[db_names.bus].command(
        {
            "explain": {"find": "limit_pushdown", "filter": {"status": "pending"}, "limit": 1},
            "verbosity": "executionStats",
        }
    )
    assert explained["executionStats"]["totalKeysExamined"] <= 2
