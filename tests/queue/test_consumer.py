"""The consumer loop under concurrency, crashes, poison messages, garbage and shutdown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from shared_contracts.queue.config import QueueConfig
from shared_contracts.queue.consumer import Consumer, Delivery, Handler
from shared_contracts.queue.engine import Queue, utcnow
from tests.queue.conftest import FAST, Job
from tests.support import eventually


@contextlib.asynccontextmanager
async def consuming(
    queue: Queue, handler: Handler, *, count: int = 1, config: QueueConfig | None = None
) -> AsyncIterator[list[Consumer]]:
    if config is not None:
        queue = Queue(queue.collection, config=config, types=queue.types)
    consumers = [Consumer(queue, handler, worker=f"worker-{i}") for i in range(count)]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        yield consumers
    finally:
        for consumer in consumers:
            consumer.stop(grace_seconds=5)
        await asyncio.gather(*tasks)


async def count(queue: Queue, **query: Any) -> int:
    return await queue.collection.count_documents(query)


async def test_three_consumers_handle_500_messages_exactly_once(jobs: Queue) -> None:
    await jobs.publish_many(Job(n=n) for n in range(500))
    handled: collections.Counter[int] = collections.Counter()

    async def handler(delivery: Delivery) -> None:
        assert isinstance(delivery.message, Job)
        handled[delivery.message.n] += 1

    # Claims never overlap while a lease holds. Leases long enough that a loaded machine never
    # lets one expire: a redelivery after expiry is at-least-once by design, tested on its own
    # (test_a_crashed_consumer_s_message_is_redelivered_after_its_lease).
    async with consuming(jobs, handler, count=3, config=replace(FAST, lease_seconds=120)):
        await eventually(lambda: _done(jobs, 500), within=180, interval=0.5)
    assert handled == collections.Counter(range(500))
    assert await count(jobs, status="done") == 500


async def _done(queue: Queue, expected: int) -> bool:
    return await count(queue, status="done") == expected


async def test_a_crashed_consumer_s_message_is_redelivered_after_its_lease(jobs: Queue) -> None:
    short = replace(FAST, lease_seconds=1, reap_interval_seconds=0.2)
    await jobs.publish(Job(n=7))
    started = asyncio.Event()
    hang = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        await hang.wait()

    crashed = Consumer(Queue(jobs.collection, config=short, types=jobs.types), stuck, worker="a")
    crash_task = asyncio.create_task(crashed.run())
    await asyncio.wait_for(started.wait(), 20)
    stale_claim = next(iter(await _active_claims(jobs)))
    crash_task.cancel()  # killed mid-handler: no ack, no release, no more lease renewal
    await asyncio.gather(crash_task, return_exceptions=True)
    assert await count(jobs, status="active") == 1

    handled = []

    async def works(delivery: Delivery) -> None:
        handled.append(delivery.claim.attempts)

    async with consuming(jobs, works, config=short):
        await eventually(lambda: _done(jobs, 1), within=30)
    assert handled == [2]
    assert await jobs.ack(stale_claim) is False  # the stale worker's late ack is rejected


async def _active_claims(queue: Queue) -> list[Any]:
    from shared_contracts.queue.engine import Claim

    return [
        Claim(id=d["_id"], token=d["claimToken"], document=d)
        async for d in queue.collection.find({"status": "active"})
    ]


async def test_a_handler_that_always_raises_ends_dead_with_growing_backoff(jobs: Queue) -> None:
    await jobs.publish(Job(n=1))
    scheduled_delays = []

    async def poison(delivery: Delivery) -> None:
        error = delivery.claim.document.get("lastError")
        if error:
            delay = delivery.claim.document["availableAt"] - error["at"]
            scheduled_delays.append(delay.total_seconds())
        raise RuntimeError("cannot handle this")

    async with consuming(jobs, poison):
        await eventually(lambda: _count_is(jobs, 1, status="dead"), within=30)
    dead = await jobs.collection.find_one({})
    assert dead["attempts"] == FAST.max_attempts
    assert dead["lastError"]["message"] == "cannot handle this"
    assert len(scheduled_delays) == FAST.max_attempts - 1
    assert scheduled_delays == sorted(scheduled_delays)


async def _count_is(queue: Queue, expected: int, **query: Any) -> bool:
    return await count(queue, **query) == expected


async def test_messages_sharing_an_ordering_key_are_handled_one_at_a_time_in_order(
    jobs: Queue,
) -> None:
    keys = [f"user:{i}" for i in range(5)]
    for n in range(8):
        for key in keys:
            await jobs.publish(Job(n=n, key=key))
    seen: dict[str, list[int]] = collections.defaultdict(list)
    busy: set[str] = set()
    overlaps = []

    async def handler(delivery: Delivery) -> None:
        message = delivery.message
        assert isinstance(message, Job)
        assert message.key is not None
        if message.key in busy:
            overlaps.append(message.key)
        busy.add(message.key)
        await asyncio.sleep(random.uniform(0, 0.01))
        seen[message.key].append(message.n)
        busy.discard(message.key)

    async with consuming(jobs, handler, count=3):
        await eventually(lambda: _done(jobs, 40), within=120)
    assert overlaps == []
    assert {key: seen[key] for key in keys} == {key: list(range(8)) for key in keys}


async def test_a_change_stream_wakes_the_consumer_long_before_the_poll_interval(
    jobs: Queue,
) -> None:
    slow_poll = replace(FAST, poll_interval_seconds=30)
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        handled.set()

    async with consuming(jobs, handler, config=slow_poll) as (consumer,):
        await eventually(lambda: _true(consumer.change_stream_active), within=20)
        await asyncio.sleep(0.2)  # the consumer is now asleep in its 30 s poll wait
        await jobs.publish(Job(n=1))
        await asyncio.wait_for(handled.wait(), timeout=10)


async def _true(value: bool) -> bool:
    return value


async def test_garbage_goes_dead_and_good_messages_keep_flowing(jobs: Queue) -> None:
    now = utcnow()
    garbage = [
        {"foo": 1},
        {"status": "weird", "type": "job"},
        {"status": "pending", "availableAt": "tomorrow", "type": "job", "schemaVersion": 1},
        {"status": "pending", "availableAt": now, "type": "bogus", "schemaVersion": 1},
        {"status": "pending", "availableAt": now, "type": "job", "schemaVersion": 99, "n": 1},
        {"status": "pending", "availableAt": now, "type": "job", "schemaVersion": 1, "n": "x"},
        {"status": "pending", "availableAt": now, "attempts": "three", "type": "job", "n": 1},
        {"status": "pending", "availableAt": now, "type": 42},
    ]
    await jobs.collection.insert_many(garbage)
    await jobs.publish_many(Job(n=n) for n in range(5))
    handled = []

    async def handler(delivery: Delivery) -> None:
        assert isinstance(delivery.message, Job)
        handled.append(delivery.message.n)

    async with consuming(jobs, handler):
        await eventually(lambda: _count_is(jobs, len(garbage), status="dead"), within=30)
        await eventually(lambda: _done(jobs, 5), within=30)
    assert sorted(handled) == list(range(5))
    async for dead in jobs.collection.find({"status": "dead"}):
        assert dead["lastError"]["message"], dead


async def test_graceful_stop_releases_a_claim_its_handler_cannot_finish(jobs: Queue) -> None:
    await jobs.publish(Job(n=1))
    started = asyncio.Event()

    async def never_finishes(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    consumer = Consumer(jobs, never_finishes)
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(started.wait(), 20)
    consumer.stop(grace_seconds=0.2)
    await asyncio.wait_for(task, 20)
    stored = await jobs.collection.find_one({})
    assert (stored["status"], stored["attempts"]) == ("pending", 0)


async def test_graceful_stop_lets_a_running_handler_finish(jobs: Queue) -> None:
    await jobs.publish(Job(n=1))
    started, proceed = asyncio.Event(), asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        started.set()
        await proceed.wait()

    consumer = Consumer(jobs, slow)
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(started.wait(), 20)
    consumer.stop(grace_seconds=20)
    proceed.set()
    await asyncio.wait_for(task, 20)
    assert (await jobs.collection.find_one({}))["status"] == "done"
