"""Claiming and handling messages in batches: claim_many, ack_many, the batch consumer.

A batch is claimed under one token in three commands, keeps ordering keys, is acked in the
handler's transaction all or nothing, and a batch that fails is handled one message at a
time, so one bad message fails alone."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import monitoring
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.mongo import in_transaction, make_client
from shared_contracts.queue.consumer import Consumer, Delivery, ack_all
from shared_contracts.queue.documents import PARKED
from shared_contracts.queue.engine import LeaseLost, Queue
from tests.queue.conftest import FAST, Job
from tests.support import eventually


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_batch_is_claimed_in_three_commands_in_arrival_order(
    jobs: Queue, mongo_uri: str
) -> None:
    await jobs.publish_many(Job(n=n) for n in range(30))
    commands = Commands()
    client: Any = make_client(mongo_uri, app_name="batches", event_listeners=[commands])
    try:
        queue = Queue(client[jobs.collection.database.name][jobs.name], config=FAST,
                      types=jobs.types)  # fmt: skip
        claims = await queue.claim_many(worker="w", limit=20)
        assert commands.names == ["find", "update", "find"]
        assert [c.document["n"] for c in claims] == list(range(20))
        assert len({c.token for c in claims}) == 1
        rest = await queue.claim_many(worker="w", limit=20)
        assert [c.document["n"] for c in rest] == list(range(20, 30))
        assert await queue.claim_many(worker="w", limit=20) == []
    finally:
        await client.close()


async def test_a_batch_keeps_ordering_keys(jobs: Queue) -> None:
    """A message behind an unfinished one of its key (another worker's, or earlier in the same
    batch) is parked, not handed out; it goes once the earlier one is finished."""
    await jobs.publish(Job(n=0, key="a"))
    (first,) = await jobs.claim_many(worker="other", limit=1)
    await jobs.publish_many([Job(n=1, key="a"), Job(n=2, key="b"), Job(n=3, key="b"), Job(n=4)])
    claims = await jobs.claim_many(worker="w", limit=10)
    assert sorted(c.document["n"] for c in claims) == [2, 4]
    parked = await jobs.collection.find({"availableAt": PARKED}).to_list()
    assert sorted(d["n"] for d in parked) == [1, 3]

    async def finish(claims: list[Any]) -> None:
        async def ack(session: AsyncClientSession) -> None:
            await jobs.ack_many(claims, session=session)

        await in_transaction(jobs.collection.database.client, ack)
        await jobs.promote_after(claims)

    await finish(claims)
    assert [c.document["n"] for c in await jobs.claim_many(worker="w", limit=10)] == [3]
    await jobs.ack(first)  # outside a transaction it promotes at once
    assert [c.document["n"] for c in await jobs.claim_many(worker="w", limit=10)] == [1]


async def test_a_batch_whose_lease_was_lost_is_acked_not_at_all(jobs: Queue) -> None:
    await jobs.publish_many(Job(n=n) for n in range(5))
    claims = await jobs.claim_many(worker="w", limit=5)
    # One lease ran out and another worker took that message.
    await jobs.collection.update_one({"_id": claims[2].id}, {"$set": {"claimToken": "theirs"}})

    async def ack(session: AsyncClientSession) -> None:
        await jobs.ack_many(claims, session=session)

    try:
        await in_transaction(jobs.collection.database.client, ack)
    except LeaseLost:
        pass
    else:
        raise AssertionError("a batch with a lost lease was acked")
    assert await jobs.collection.count_documents({"status": "done"}) == 0


def batch_consumer(queue: Queue, seen: collections.Counter[int], bad: set[int]) -> Consumer:
    """Records each message it handles; a batch holding a bad one fails, and a bad one fails
    alone too."""

    async def handle(delivery: Delivery) -> None:
        assert isinstance(delivery.message, Job)
        if delivery.message.n in bad:
            raise RuntimeError(f"bad {delivery.message.n}")
        seen[delivery.message.n] += 1

    async def handle_batch(deliveries: list[Delivery]) -> None:
        numbers = [d.message.n for d in deliveries if isinstance(d.message, Job)]
        if bad & set(numbers):
            raise RuntimeError("a bad message in the batch")

        async def ack(session: AsyncClientSession) -> None:
            await ack_all(deliveries, session=session)

        await in_transaction(queue.collection.database.client, ack)
        seen.update(numbers)

    return Consumer(queue, handle, batch_handler=handle_batch, batch_size=8)


async def test_a_failing_batch_is_handled_one_message_at_a_time(jobs: Queue) -> None:
    await jobs.publish_many(Job(n=n) for n in range(20))
    seen: collections.Counter[int] = collections.Counter()
    consumer = batch_consumer(jobs, seen, bad={5})
    assert await consumer.drain() >= 20  # the bad one may come back (short backoff)
    assert seen == collections.Counter({n: 1 for n in range(20) if n != 5})
    failed = await jobs.collection.find_one({"n": 5})
    assert failed is not None
    assert failed["status"] in ("pending", "dead")
    assert failed["attempts"] >= 1
    assert failed["lastError"]["message"] == "bad 5"
    assert await jobs.collection.count_documents({"status": "done"}) == 19


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    keys=st.lists(st.sampled_from([None, "a", "b", "c"]), min_size=1, max_size=40),
    batch=st.integers(1, 12),
    consumers=st.integers(1, 3),
)
async def test_batch_consumers_handle_each_message_once_in_key_order(
    jobs: Queue, keys: list[str | None], batch: int, consumers: int
) -> None:
    await jobs.collection.delete_many({})
    await jobs.publish_many(Job(n=n, key=k) for n, k in enumerate(keys))
    order: list[int] = []
    active: set[str] = set()
    overlaps: list[str] = []

    async def handle(delivery: Delivery) -> None:
        raise AssertionError("no batch fails here")

    async def handle_batch(deliveries: list[Delivery]) -> None:
        messages = [d.message for d in deliveries if isinstance(d.message, Job)]
        mine = {m.key for m in messages if m.key}
        overlaps.extend(active & mine)
        active.update(mine)
        await asyncio.sleep(0.001)

        async def ack(session: AsyncClientSession) -> None:
            await ack_all(deliveries, session=session)

        await in_transaction(jobs.collection.database.client, ack)
        order.extend(m.n for m in messages)
        active.difference_update(mine)

    queue = Queue(jobs.collection, config=replace(FAST, lease_seconds=120), types=jobs.types)
    workers = [Consumer(queue, handle, batch_handler=handle_batch, batch_size=batch,
                        worker=f"w{i}") for i in range(consumers)]  # fmt: skip
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await eventually(lambda: _all_done(jobs, len(keys)), within=60)
    finally:
        for worker in workers:
            worker.stop(grace_seconds=5)
        await asyncio.gather(*tasks)
    assert sorted(order) == list(range(len(keys)))
    assert overlaps == []
    for key in {k for k in keys if k}:
        mine = [n for n in order if keys[n] == key]
        assert mine == sorted(mine), f"key {key} out of order: {mine}"


async def _all_done(queue: Queue, count: int) -> bool:
    return await queue.collection.count_documents({"status": "done"}) == count
