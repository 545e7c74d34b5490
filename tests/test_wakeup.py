"""The wake-up stream is read only while a worker waits: a busy worker sends no getMore, and
what changed meanwhile wakes its next wait at once. A waiting worker's stream is read at most
once per read interval while the server is busy with writes the stream does not match."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from shared_contracts.mongo import make_client
from shared_contracts.wakeup import Wakeup
from swamp_app.runtime import AppRuntime
from swamp_app.scores.consumer import score_refresh_consumer
from swamp_app.settings import AppSettings
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings
from tests.support import DbNames, SeenCommands, eventually


@contextlib.asynccontextmanager
async def watching(
    mongo_uri: str, db_names: DbNames, *, read_interval: float = 0.0
) -> AsyncIterator[tuple[Wakeup, SeenCommands]]:
    get_mores = SeenCommands()
    client: AsyncMongoClient[dict[str, Any]] = make_client(
        mongo_uri, app_name="wakeup-test", event_listeners=[get_mores]
    )
    wakeup = Wakeup(
        client[db_names.telemetry]["things"],
        [{"$match": {"operationType": "insert"}}],
        poll_interval_seconds=30,
        read_interval_seconds=read_interval,
    )
    task = asyncio.create_task(wakeup.watch_forever())
    try:
        await eventually(lambda: _true(wakeup.active), within=20)
        wakeup.clear()  # the opening wake-up: anything before the stream opened
        yield wakeup, get_mores
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_busy_worker_reads_no_change_and_its_next_wait_wakes_at_once(
    mongo_client: AsyncMongoClient[dict[str, Any]], mongo_uri: str, db_names: DbNames
) -> None:
    things = mongo_client[db_names.telemetry]["things"]
    async with watching(mongo_uri, db_names) as (wakeup, get_mores):
        for n in range(20):  # the worker is busy: nobody waits
            await things.insert_one({"n": n})
        await asyncio.sleep(0.5)
        assert get_mores.count("getMore") == 0
        # Those changes were made after the worker last looked: its wait ends at once.
        assert await asyncio.wait_for(wakeup.wait(), timeout=20)
        assert get_mores.count("getMore") >= 1


async def test_a_change_while_waiting_wakes_the_worker(
    mongo_client: AsyncMongoClient[dict[str, Any]], mongo_uri: str, db_names: DbNames
) -> None:
    things = mongo_client[db_names.telemetry]["things"]
    async with watching(mongo_uri, db_names) as (wakeup, _):
        waiting = asyncio.create_task(wakeup.wait())
        await asyncio.sleep(0.2)
        await things.insert_one({"n": 1})
        assert await asyncio.wait_for(waiting, timeout=20)


@pytest.mark.parametrize("woken", [True, False])
async def test_a_wait_without_the_stream_reads_nothing_and_ends_by_set_or_time(
    mongo_client: AsyncMongoClient[dict[str, Any]], mongo_uri: str, db_names: DbNames, woken: bool
) -> None:
    things = mongo_client[db_names.telemetry]["things"]
    async with watching(mongo_uri, db_names) as (wakeup, get_mores):
        waiting = asyncio.create_task(wakeup.wait(0.5 if not woken else 30, stream=False))
        for n in range(5):
            await things.insert_one({"n": n})
        if woken:
            wakeup.set()  # stop() and the like still end it
        assert await asyncio.wait_for(waiting, timeout=20) is woken
        assert get_mores.count("getMore") == 0


async def test_a_waiting_stream_reads_once_per_interval_while_other_writes_go_on(
    mongo_client: AsyncMongoClient[dict[str, Any]], mongo_uri: str, db_names: DbNames
) -> None:
    """The embedded server answers a waiting stream's read at every write, also to another
    collection (tests/test_embedded_gaps.py shows it alone): without the interval the command
    consumer, idle, read its stream once per write of the whole pipeline."""
    database = mongo_client[db_names.telemetry]
    interval = 0.5
    async with watching(mongo_uri, db_names, read_interval=interval) as (wakeup, get_mores):
        waiting = asyncio.create_task(wakeup.wait(60))
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n in range(60):  # writes the stream does not match, for about 1.2 s
            await database["others"].insert_one({"n": n})
            await asyncio.sleep(0.02)
        elapsed = loop.time() - started
        assert not waiting.done()
        # The first read, then one per interval begun in the time the writes took.
        assert get_mores.count("getMore") <= 2 + elapsed / interval
        await database["things"].insert_one({"n": 1})
        assert await asyncio.wait_for(waiting, timeout=20)


async def test_a_pause_that_ends_with_nobody_waiting_reads_nothing(
    mongo_client: AsyncMongoClient[dict[str, Any]], mongo_uri: str, db_names: DbNames
) -> None:
    """A helper's attack: the pause ended with a read even when the worker had stopped waiting
    in it (busy again, or a replica waiting without the stream)."""
    others = mongo_client[db_names.telemetry]["others"]
    interval = 0.5
    async with watching(mongo_uri, db_names, read_interval=interval) as (wakeup, get_mores):
        for n in range(3):
            waiting = asyncio.create_task(wakeup.wait(0.1))
            await asyncio.sleep(0.03)
            await others.insert_one({"n": n})  # answers the read, empty: a pause begins
            assert not await waiting  # the worker stops waiting (busy) inside the pause
            before = get_mores.count("getMore")
            await asyncio.sleep(interval + 0.3)
            assert get_mores.count("getMore") == before, "a getMore while nobody waits"


async def test_only_the_command_consumer_rests_between_empty_reads(
    mongo_client: AsyncMongoClient[dict[str, Any]],
    telemetry_settings: TelemetrySettings,
    app_settings: AppSettings,
) -> None:
    """On the event path (the watcher, the app's refresh consumer) a rest delays every event's
    score: a `make bench` at 404b20c (figures in efaf77c's message) measured lag p99 at 80% of
    capacity 1.201 -> 1.465 s."""
    telemetry = TelemetryRuntime(settings=telemetry_settings, client=mongo_client)
    app = AppRuntime(settings=app_settings, client=mongo_client)
    assert command_consumer(telemetry).wakeup.read_interval_seconds == pytest.approx(
        telemetry_settings.command_stream_read_interval_seconds
    )
    assert telemetry_settings.command_stream_read_interval_seconds > 0
    assert IngestWatcher(telemetry).wakeup.read_interval_seconds == 0
    assert score_refresh_consumer(app).wakeup.read_interval_seconds == 0
