"""No update_many or delete_many outside a transaction, checked on the syntax tree: outside a
caller's transaction they go through ``shared_contracts.mongo``, which runs them in one of their
own. On the embedded server a plain one that meets a transaction's write deadlocks the server
(tests/test_embedded_gaps.py); the tests' own helpers are held to it too, since they race the
services' transactions."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient

from shared_contracts import mongo
from tests.support import DbNames, SeenCommands

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["shared_contracts", "telemetry_service", "swamp_app", "swamp_club", "bench", "tests"]
ALLOWED = {
    "shared_contracts/mongo.py",  # the two functions themselves
    "tests/test_embedded_gaps.py",  # the minimal test of the server's gap
    "tests/test_multi_document_writes.py",  # this check's own examples
}
MULTI = {"update_many", "delete_many"}


def plain_multi_writes(source: str) -> list[int]:
    """Lines of ``x.update_many(...)`` / ``x.delete_many(...)`` without ``session=``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in MULTI:
            continue
        through_helper = isinstance(node.func.value, ast.Name) and node.func.value.id == "mongo"
        if not through_helper and not any(k.arg == "session" for k in node.keywords):
            found.append(node.lineno)
    return found


def test_no_multi_document_write_runs_outside_a_transaction() -> None:
    offenders = []
    for package in CHECKED:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative not in ALLOWED:
                offenders += [f"{relative}:{n}" for n in plain_multi_writes(path.read_text())]
    assert offenders == []


@pytest.mark.parametrize(
    "source",
    [
        "await db[EVENTS].update_many({}, {})",
        "await self.collection.delete_many({'status': 'done'})",
        "await collection.update_many(\n    {},\n    {'$set': {'a': 1}},\n)",
    ],
)
def test_the_check_sees_a_plain_multi_document_write(source: str) -> None:
    assert plain_multi_writes(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "await mongo.update_many(db[EVENTS], {}, {})",
        "await mongo.delete_many(collection, {})",
        "await db[EVENTS].update_many({}, {}, session=session)",
        "await db[EVENTS].update_one({}, {})",
    ],
)
def test_the_check_lets_through_transactional_and_single_document_writes(source: str) -> None:
    assert plain_multi_writes(source) == []


# --- writes over a set of any size: chunked -----------------------------------------------------


async def test_update_all_visits_each_document_once_in_bounded_transactions(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames, mongo_uri: str
) -> None:
    collection = mongo_client[db_names.bus]["update_all"]
    await collection.insert_many([{"_id": f"d{i:04d}", "n": 0, "odd": i % 2} for i in range(25)])
    commands = SeenCommands()
    client = mongo.make_client(mongo_uri, app_name="chunks", event_listeners=[commands])
    try:
        counted = client[db_names.bus]["update_all"]
        # still matching after the update: a loop that re-read the query would never end
        assert (
            await mongo.update_all(counted, {"n": {"$gte": 0}}, {"$inc": {"n": 1}}, chunk=10) == 25
        )
    finally:
        await client.close()
    assert commands.count("commitTransaction") == 3  # 10 + 10 + 5
    assert commands.count("update") == 3
    assert [d["n"] async for d in collection.find()] == [1] * 25
    only_odd = {"odd": 1, "_id": {"$in": ["d0001", "d0002", "d0003"]}}
    assert await mongo.update_all(collection, only_odd, {"$inc": {"n": 1}}, chunk=1) == 2
    assert await mongo.update_all(collection, {"n": 99}, {"$inc": {"n": 1}}) == 0


async def test_delete_all_deletes_every_match_in_chunks(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> None:
    collection = mongo_client[db_names.bus]["delete_all"]
    await collection.insert_many([{"_id": i, "done": i % 3 != 0} for i in range(30)])
    assert await mongo.delete_all(collection, {"done": True}, chunk=7) == 20
    assert sorted([d["_id"] async for d in collection.find()]) == list(range(0, 30, 3))
    assert await mongo.delete_all(collection, {}, chunk=100) == 10
    assert await collection.count_documents({}) == 0


async def test_update_all_and_delete_all_reach_ids_of_every_type(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> None:
    """Found by attack: paging by ``_id > last`` compares within one BSON type only, so the
    ids of a type sorting after a page's last one were never visited."""
    collection = mongo_client[db_names.bus]["id_types"]
    ids: list[Any] = [1, 2.5, "a", "b", ObjectId(), ObjectId(), True]
    await collection.insert_many([{"_id": i, "x": 0} for i in ids])
    assert await mongo.update_all(collection, {}, {"$set": {"x": 1}}, chunk=2) == len(ids)
    assert await collection.count_documents({"x": 0}) == 0
    assert await mongo.delete_all(collection, {"x": 1}, chunk=2) == len(ids)
