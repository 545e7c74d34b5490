"""Messages published to wait (``publish_many(not_before=...)``, a burst's score refreshes):
claimable only from their time, their time kept by the publishes that coalesce into them, and a
consumer that sleeps until that time, not a whole poll interval."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from shared_contracts.messages import ScoreRefresh, score_refresh_key
from shared_contracts.mongo import make_client
from shared_contracts.queue.consumer import Consumer, Delivery
from shared_contracts.queue.documents import PARKED, PENDING
from shared_contracts.queue.engine import Queue
from tests.queue.conftest import FAST, Job
from tests.support import SeenFilters, eventually

T0 = datetime(2026, 12, 4, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def refresh(user: str, version: int) -> ScoreRefresh:
    return ScoreRefresh(
        userId=user,
        username=None,
        reason="ingest",
        projectionVersion=version,
        snapshot={"successCount": version},
    )


async def test_a_message_published_not_before_a_time_is_claimed_from_then(jobs: Queue) -> None:
    clock = Clock()
    queue = Queue(jobs.collection, config=FAST, types=jobs.types, clock=clock)
    await queue.publish_many([Job(n=1)], not_before=T0 + timedelta(seconds=2))
    await queue.publish_many([Job(n=2)])

    claims = await queue.claim_many(worker="w", limit=10)
    assert [c.document["n"] for c in claims] == [2]
    assert await queue.claim_many(worker="w", limit=10) == []
    assert queue.next_available_at == T0 + timedelta(seconds=2)

    clock.now = T0 + timedelta(seconds=2)
    assert [c.document["n"] for c in await queue.claim_many(worker="w", limit=10)] == [1]
    assert await queue.claim_many(worker="w", limit=10) == []
    assert queue.next_available_at is None


async def test_a_time_in_the_past_is_now(jobs: Queue) -> None:
    clock = Clock()
    queue = Queue(jobs.collection, config=FAST, types=jobs.types, clock=clock)
    await queue.publish_many([Job(n=1)], not_before=T0 - timedelta(days=1))
    document = await queue.collection.find_one({"n": 1})
    assert document is not None
    assert document["availableAt"] == T0


async def test_the_next_time_is_the_earliest_and_never_a_parked_message(events: Queue) -> None:
    clock = Clock()
    queue = Queue(events.collection, config=FAST, types=events.types, clock=clock)
    await queue.publish_many([refresh("later", 1)], not_before=T0 + timedelta(seconds=9))
    await queue.publish_many([refresh("sooner", 1)], not_before=T0 + timedelta(seconds=3))
    await queue.collection.update_one({"userId": "later"}, {"$set": {"availableAt": PARKED}})
    assert await queue.claim_many(worker="w", limit=10) == []
    assert queue.next_available_at == T0 + timedelta(seconds=3)
    await queue.collection.update_one(
        {"userId": "sooner"}, {"$set": {"availableAt": PARKED}}
    )  # only parked ones left: nothing becomes available by time alone
    assert await queue.claim_many(worker="w", limit=10) == []
    assert queue.next_available_at is None


async def test_publishes_into_a_waiting_refresh_keep_its_time(events: Queue) -> None:
    """The burst's point: the batches that follow coalesce into the waiting refresh (newest
    snapshot), without making it claimable sooner or pushing it later; a parked one stays
    parked."""
    clock = Clock()
    queue = Queue(events.collection, config=FAST, types=events.types, clock=clock)
    due = T0 + timedelta(seconds=2)
    await queue.publish_many([refresh("u", 1)], not_before=due)
    clock.now = T0 + timedelta(seconds=1)
    await queue.publish_many([refresh("u", 2)])
    await queue.publish_many([refresh("u", 3)], not_before=T0 + timedelta(seconds=5))
    (document,) = await queue.collection.find({"dedupeKey": score_refresh_key("u")}).to_list()
    assert document["availableAt"] == due
    assert document["projectionVersion"] == 3
    assert await queue.claim_many(worker="w", limit=10) == []

    clock.now = due
    (claim,) = await queue.claim_many(worker="w", limit=10)
    assert claim.document["projectionVersion"] == 3

    await queue.publish_many([refresh("p", 1)])
    await queue.collection.update_one({"userId": "p"}, {"$set": {"availableAt": PARKED}})
    await queue.publish_many([refresh("p", 2)], not_before=due)
    (parked,) = await queue.collection.find({"userId": "p", "status": PENDING}).to_list()
    assert parked["availableAt"] == PARKED


async def test_a_consumer_sleeps_until_a_waiting_message_s_time_not_a_poll_interval(
    jobs: Queue,
) -> None:
    """Nothing wakes a consumer when a waiting message's time comes (no write happens then):
    it sleeps until that time. With a poll interval of a minute, the message is handled within
    the test's patience only because of that."""
    config = replace(FAST, poll_interval_seconds=60.0)
    queue = Queue(jobs.collection, config=config, types=jobs.types)
    handled: list[Any] = []

    async def handle_batch(deliveries: list[Delivery]) -> None:
        handled.extend(d.message for d in deliveries)

    async def handle(delivery: Delivery) -> None:
        raise AssertionError("a batch consumer handles one at a time only after a failure")

    consumer = Consumer(queue, handle, worker="w", batch_handler=handle_batch, batch_size=10)
    running = asyncio.create_task(consumer.run())
    try:
        await asyncio.sleep(0.5)  # the consumer has found nothing and sleeps
        soon = datetime.now(UTC) + timedelta(seconds=0.5)
        await queue.publish_many([Job(n=7)], not_before=soon)
        await eventually(lambda: _handled(handled), within=20)
    finally:
        consumer.stop(grace_seconds=1)
        await asyncio.wait_for(running, timeout=10)
    assert [job.n for job in handled if isinstance(job, Job)] == [7]


async def _handled(handled: list[Any]) -> bool:
    return bool(handled)


async def test_a_claim_that_read_every_pending_message_is_not_followed_by_an_empty_one(
    jobs: Queue, mongo_uri: str
) -> None:
    """With a change stream to report news, a consumer whose claim read the whole pending range
    waits for news instead of claiming again at once (which found nothing: a command per
    batch); what arrives meanwhile is still claimed at once."""
    filters = SeenFilters()
    client: Any = make_client(mongo_uri, app_name="no-empty-claim", event_listeners=[filters])
    config = replace(FAST, poll_interval_seconds=30.0)
    queue = Queue(client[jobs.collection.database.name][jobs.name], config=config,
                  types=jobs.types)  # fmt: skip
    handled: list[int] = []

    async def handle_batch(deliveries: list[Delivery]) -> None:
        handled.extend(d.message.n for d in deliveries if isinstance(d.message, Job))

    async def handle(delivery: Delivery) -> None:
        raise AssertionError("a batch consumer handles one at a time only after a failure")

    def candidate_reads() -> int:
        return sum(1 for name, f in filters.filters if name == jobs.name and "availableAt" in f
                   and f.get("status") == PENDING and "_id" not in f)  # fmt: skip

    consumer = Consumer(queue, handle, worker="w", batch_handler=handle_batch, batch_size=10)
    running = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: _true(consumer.change_stream_active))
        await asyncio.sleep(0.3)  # its first claim found nothing; it waits for news
        before = candidate_reads()
        await jobs.publish(Job(n=1))
        await eventually(lambda: _true(handled == [1]))
        await asyncio.sleep(0.5)
        assert candidate_reads() == before + 1  # the claim that found it, and none after
        await jobs.publish(Job(n=2))  # news while it waits: claimed at once
        await eventually(lambda: _true(handled == [1, 2]), within=10)
    finally:
        consumer.stop(grace_seconds=1)
        await asyncio.wait_for(running, timeout=10)
        await client.close()


async def _true(value: bool) -> bool:
    return value
