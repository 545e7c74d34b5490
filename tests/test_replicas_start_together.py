"""Replicas deployed at once on a fresh database all start: every start-up step that creates
something (collections, indexes, the counter and the main line's document) tolerates another
replica creating it at the same moment. Found by bench/replicas.py: one of four telemetry
processes now and then exited at start-up (uvicorn's lifespan failure, exit 3) with
CollectionInvalid; six concurrent start-ups failed in every one of 15 rounds."""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo import AsyncMongoClient

from shared_contracts.mongo import make_client
from shared_contracts.queue.indexes import ensure_queue_indexes
from swamp_app.collections import ensure_indexes as ensure_app_indexes
from telemetry_service.collections import COUNTERS, PROGRESS
from telemetry_service.collections import ensure_indexes as ensure_telemetry_indexes
from tests.support import DbNames

REPLICAS = 6


async def test_replicas_starting_together_on_a_fresh_database_all_start(
    mongo_uri: str, mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> None:
    clients = [make_client(mongo_uri, app_name=f"replica-{n}") for n in range(REPLICAS)]
    try:

        async def start(client: AsyncMongoClient[dict[str, Any]]) -> None:
            await ensure_telemetry_indexes(client[db_names.telemetry])
            await ensure_queue_indexes(client[db_names.bus], done_retention_seconds=3600)
            await ensure_app_indexes(client[db_names.app])

        for _ in range(3):  # a race: a few rounds, each on databases just dropped
            for name in db_names.all():
                await mongo_client.drop_database(name)
            outcomes = await asyncio.gather(*map(start, clients), return_exceptions=True)
            assert [o for o in outcomes if o is not None] == []
            telemetry = mongo_client[db_names.telemetry]
            assert await telemetry[COUNTERS].count_documents({}) == 1
            assert await telemetry[PROGRESS].count_documents({}) == 1
    finally:
        for client in clients:
            await client.close()
