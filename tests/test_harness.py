"""The harness works against the database it was given: the features the design relies on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from swamp_app.main import create_app as create_main_app
from swamp_app.settings import AppSettings
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.settings import TelemetrySettings
from tests.support import DbNames, asgi_client, uvicorn_client

Client = AsyncMongoClient[dict[str, Any]]


class Abort(Exception):
    pass


async def test_transaction_across_two_databases_commits_or_aborts_as_one(
    mongo_client: Client, db_names: DbNames
) -> None:
    left = mongo_client[db_names.telemetry]["things"]
    right = mongo_client[db_names.bus]["things"]
    # Create the collections first: mongod before 4.4 and sharded clusters refuse to create
    # them inside a transaction.
    await left.insert_one({"_id": "seed"})
    await right.insert_one({"_id": "seed"})

    async with mongo_client.start_session() as session, await session.start_transaction():
        await left.insert_one({"_id": "committed"}, session=session)
        await right.insert_one({"_id": "committed"}, session=session)

    async def write_both_then_fail() -> None:
        async with mongo_client.start_session() as session, await session.start_transaction():
            await left.insert_one({"_id": "aborted"}, session=session)
            await right.insert_one({"_id": "aborted"}, session=session)
            raise Abort

    with pytest.raises(Abort):
        await write_both_then_fail()

    assert sorted(await left.distinct("_id")) == ["committed", "seed"]
    assert sorted(await right.distinct("_id")) == ["committed", "seed"]


async def test_change_stream_delivers_an_insert(mongo_client: Client, db_names: DbNames) -> None:
    collection = mongo_client[db_names.bus]["stream"]
    await collection.insert_one({"_id": "before"})
    async with await collection.watch([{"$match": {"operationType": "insert"}}]) as stream:
        await collection.insert_one({"_id": "after"})
        change = await asyncio.wait_for(stream.next(), timeout=10)
    assert change["documentKey"] == {"_id": "after"}


async def test_partial_unique_index_rejects_a_duplicate(
    mongo_client: Client, db_names: DbNames
) -> None:
    collection = mongo_client[db_names.bus]["partial"]
    await collection.create_index(
        "key", unique=True, partialFilterExpression={"status": "pending"}, name="one_pending"
    )
    await collection.insert_one({"key": "k", "status": "pending"})
    await collection.insert_one({"key": "k", "status": "active"})  # outside the filter: allowed
    with pytest.raises(DuplicateKeyError):
        await collection.insert_one({"key": "k", "status": "pending"})


async def test_both_apps_serve_health_in_process(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> None:
    for app in (create_telemetry_app(telemetry_settings), create_main_app(app_settings)):
        async with asgi_client(app) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["database"] == "ok"


async def test_app_serves_over_real_uvicorn(telemetry_settings: TelemetrySettings) -> None:
    async with uvicorn_client(create_telemetry_app(telemetry_settings)) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200
