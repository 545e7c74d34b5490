"""Shared collection helpers: what they cost in round trips."""

from __future__ import annotations

from typing import Any

import pytest

from shared_contracts.mongo import MAX_IN_IDS, make_client
from telemetry_service.collections import find_by_ids
from tests.support import DbNames, SeenCommands


@pytest.mark.parametrize("count", [1, 7, MAX_IN_IDS, MAX_IN_IDS + 3])
async def test_find_by_ids_is_one_round_trip_per_chunk_even_when_every_id_is_found(
    mongo_uri: str, db_names: DbNames, count: int
) -> None:
    commands = SeenCommands()
    client: Any = make_client(mongo_uri, app_name="find-by-ids", event_listeners=[commands])
    try:
        things = client[db_names.telemetry]["things"]
        await things.insert_many([{"_id": n} for n in range(count)])
        commands.seen.clear()
        found = await find_by_ids(things, [*range(count), -1])  # -1 is absent
        assert sorted(found) == list(range(count))
        chunks = -(-(count + 1) // MAX_IN_IDS)
        assert commands.names() == ["find"] * chunks
    finally:
        await client.close()
