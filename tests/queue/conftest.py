"""A test-only message type and queue fixtures on a fresh bus database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

import pytest
from pymongo import AsyncMongoClient

from shared_contracts.messages import Message, types_for_queue
from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from shared_contracts.queue.config import QueueConfig
from shared_contracts.queue.engine import Queue
from shared_contracts.queue.indexes import ensure_queue_indexes
from tests.support import DbNames


class Job(Message):
    """A message type only the tests use; ``key`` makes it ordered."""

    QUEUE: ClassVar[str] = TELEMETRY_COMMANDS
    type: Literal["job"] = "job"
    schemaVersion: Literal[1] = 1
    n: int
    key: str | None = None

    def ordering_key(self) -> str | None:
        return self.key


FAST = QueueConfig(
    lease_seconds=5,
    max_attempts=3,
    backoff_base_seconds=0.05,
    backoff_max_seconds=1,
    poll_interval_seconds=0.05,
    concurrency=4,
)


@pytest.fixture
async def bus(
    mongo_client: AsyncMongoClient[dict[str, Any]], db_names: DbNames
) -> AsyncIterator[Any]:
    database = mongo_client[db_names.bus]
    await ensure_queue_indexes(database, done_retention_seconds=3600)
    return database


@pytest.fixture
def jobs(bus: Any) -> Queue:
    return Queue(bus[TELEMETRY_COMMANDS], config=FAST, types={"job": Job})


@pytest.fixture
def events(bus: Any) -> Queue:
    return Queue(bus[SWAMP_CLUB_EVENTS], config=FAST, types=types_for_queue(SWAMP_CLUB_EVENTS))
