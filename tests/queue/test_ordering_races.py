"""Ordering keys under racing workers: two messages of one key are never active at once.

The ordering checks read active and pending messages in two indexed finds (the embedded server
plans one $in per query); read one after the other, a message of the key claimed between the two
(pending, then active) was in neither, and two workers held both messages of a key (found by an
attack on the change that split the read; these tests failed then)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared_contracts import mongo
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.documents import ACTIVE
from shared_contracts.queue.engine import Queue
from tests.queue.conftest import FAST, Job


class _Cursor:
    def __init__(self, cursor: Any, after: Callable[[], Awaitable[None]]) -> None:
        self._cursor, self._after = cursor, after

    async def to_list(self, *args: Any, **kwargs: Any) -> list[Any]:
        found = await self._cursor.to_list(*args, **kwargs)
        await self._after()
        return found

    async def __aiter__(self) -> Any:
        async for document in self._cursor:
            yield document
        await self._after()


class HookedCollection:
    """The real collection; after the first ordering-key find is read, runs ``hook`` once
    (another worker acting between this worker's reads)."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.hook: Callable[[], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    def find(self, query: Any = None, *args: Any, **kwargs: Any) -> Any:
        cursor = self._collection.find(query, *args, **kwargs)
        if self.hook is None or not isinstance(query, dict) or "orderingKey" not in query:
            return cursor
        hook, self.hook = self.hook, None
        return _Cursor(cursor, hook)

    async def find_one(self, query: Any = None, *args: Any, **kwargs: Any) -> Any:
        found = await self._collection.find_one(query, *args, **kwargs)
        if self.hook is not None and isinstance(query, dict) and "orderingKey" in query:
            hook, self.hook = self.hook, None
            await hook()
        return found


async def publish_at(jobs: Queue, at: datetime, *messages: Job) -> None:
    """Publish with the clock at ``at`` (claimable from then), in one bulk write: no look-up."""
    publisher = Queue(jobs.collection, config=FAST, types=jobs.types, clock=lambda: at)
    await publisher.publish_many(messages)


def racing_workers(jobs: Queue) -> tuple[Queue, Queue, list[Any]]:
    """Worker A, on a collection where worker B claims once right after A's first
    ordering-key read; worker B; and what B got then."""
    hooked = HookedCollection(jobs.collection)
    worker_b = Queue(jobs.collection, config=FAST, types=jobs.types)
    got_b: list[Any] = []

    async def b_claims() -> None:
        got_b.append(await worker_b.claim(worker="B"))

    hooked.hook = b_claims
    return Queue(hooked, config=FAST, types=jobs.types), worker_b, got_b  # type: ignore[arg-type]


async def test_two_messages_of_one_key_are_never_active_at_once(jobs: Queue) -> None:
    now = datetime.now(UTC)
    # Two messages of key "a" both claimable (a publish race / the bulk publish, which does
    # no look-up): m1 first in publish order, m2 claimable a moment earlier.
    await publish_at(jobs, now - timedelta(seconds=1), Job(n=1, key="a"))
    await publish_at(jobs, now - timedelta(seconds=2), Job(n=2, key="a"))
    worker_a, worker_b, got_b = racing_workers(jobs)
    claim_a = await worker_a.claim(worker="A")  # takes m2, checks for earlier ones of "a"
    claim_b = got_b[0] if got_b else await worker_b.claim(worker="B")

    active = await jobs.collection.find({"status": ACTIVE, "orderingKey": "a"}).to_list()
    handed_out = sorted(c.document["n"] for c in (claim_a, claim_b) if c is not None)
    message = f"handed out {handed_out}; active {sorted(d['n'] for d in active)}"
    assert len(active) <= 1, message
    assert len(handed_out) <= 1, message
    assert handed_out == [1]


async def test_a_batch_claim_never_overtakes_an_earlier_message_claimed_meanwhile(
    jobs: Queue,
) -> None:
    now = datetime.now(UTC)
    await publish_at(jobs, now - timedelta(seconds=1), Job(n=1, key="a"))
    await publish_at(jobs, now - timedelta(seconds=2), Job(n=2, key="a"), Job(n=3, key="b"))
    worker_a, _, got_b = racing_workers(jobs)
    # A batch of 2: m2 and m3 (the earliest available); m1 claimed by B during A's check.
    batch = await worker_a.claim_many(worker="A", limit=2)
    handed_out = sorted(c.document["n"] for c in [*batch, *got_b] if c is not None)
    active = await jobs.collection.find({"status": ACTIVE, "orderingKey": "a"}).to_list()
    assert len(active) <= 1, (
        f"key 'a': {sorted(d['n'] for d in active)} active at once (handed out {handed_out})"
    )


async def test_concurrent_workers_without_hooks_never_hold_two_messages_of_a_key(
    jobs: Queue,
) -> None:
    """No injected interleaving: a bulk publish (no look-up) of two messages per key, and
    concurrent workers claiming one at a time, as the consumer does."""
    now = datetime.now(UTC)
    keys = [f"k{i}" for i in range(40)]
    for i, k in enumerate(keys):  # claimable in the order m2, m1 of each key, key by key
        at = now - timedelta(seconds=10) + timedelta(milliseconds=10 * i)
        await publish_at(jobs, at + timedelta(milliseconds=1), Job(n=1, key=k))
        await publish_at(jobs, at, Job(n=2, key=k))
    workers = [Queue(jobs.collection, config=FAST, types=jobs.types) for _ in range(8)]
    claims: list[Any] = []

    async def work(queue: Queue, name: str) -> None:
        while (claim := await queue.claim(worker=name)) is not None:
            claims.append(claim)

    await asyncio.gather(*(work(q, f"w{i}") for i, q in enumerate(workers)))
    both = sorted(k for k in keys if sum(1 for c in claims if c.document["orderingKey"] == k) > 1)
    assert both == [], f"keys with both messages handed out at once: {both}"


@pytest.mark.parametrize("promotion", ["promote", "promote_after"])
async def test_a_promotion_whose_choice_another_worker_unparked_meanwhile_keeps_the_order(
    jobs: Queue, mongo_client: Any, promotion: str
) -> None:
    """A promotion reads the key's parked messages, then unparks the first by _id; another
    worker's promotion between the two took that one first. The first promotion's unpark then
    misses and it looks again: nothing is left parked for good, and the key's messages are
    still handed out one at a time in publish order."""
    await jobs.publish(Job(n=0, key="a"))
    first = await jobs.claim(worker="w")
    assert first is not None
    await jobs.publish(Job(n=1, key="a"))  # parked behind n=0
    await jobs.publish(Job(n=2, key="a"))  # parked behind n=0
    # n=0 finishes in a handler's transaction: nothing promoted yet.
    await in_transaction(mongo_client, lambda session: jobs.ack(first, session=session))

    hooked = HookedCollection(jobs.collection)
    racing = Queue(hooked, config=FAST, types=jobs.types)  # type: ignore[arg-type]

    async def another_worker_promotes() -> None:
        assert await jobs.promote("a")

    hooked.hook = another_worker_promotes
    if promotion == "promote":
        await racing.promote("a")
    else:
        await racing.promote_after([first])
    assert hooked.hook is None  # the other worker's promotion did run in between

    handled: list[int] = []
    while claims := await jobs.claim_many(worker="w", limit=10):
        active = await jobs.collection.count_documents({"status": ACTIVE, "orderingKey": "a"})
        assert active == 1, [c.document["n"] for c in claims]
        for claim in claims:
            handled.append(claim.document["n"])
            await jobs.ack(claim)  # outside a transaction: promotes the next at once
    assert handled == [1, 2]
    assert await jobs.collection.count_documents({"status": {"$ne": "done"}}) == 0


@pytest.mark.parametrize("batch", [1, 2, 5], ids=["claim", "claim_many-2", "claim_many-5"])
async def test_a_drain_does_not_stop_at_messages_it_must_park(jobs: Queue, batch: int) -> None:
    """Messages behind an unfinished earlier one of their key that are available anyway (a
    publish race; an operator's retry of dead ones) are parked by the claim that finds them.
    A claim that parked three of them in a row answered "nothing available": the drain ended
    with another key's message claimable (found by the identity state machine: renames
    retried by an operator, every key and score after them left undone)."""
    await jobs.publish(Job(n=0, key="a"))
    first = await jobs.claim(worker="slow")  # the earlier message of key a, in progress
    assert first is not None
    for n in range(1, 8):
        await jobs.publish(Job(n=n, key="a"))
    await jobs.publish(Job(n=100, key="b"))
    # As if each of a's later messages had raced past the check at publish: all available,
    # and older than b's.
    await mongo.update_many(
        jobs.collection,
        {"n": {"$gte": 1, "$lt": 100}},
        {"$set": {"availableAt": datetime.now(UTC) - timedelta(seconds=10)}},
    )
    handled: list[int] = []

    async def handle(claims: list[Any]) -> None:
        for claim in claims:
            handled.append(claim.document["n"])
            await jobs.ack(claim)

    while claims := await jobs.claim_many(worker="drain", limit=batch):
        await handle(claims)
    assert handled == [100]
    await jobs.ack(first)  # promotes a's next
    while claims := await jobs.claim_many(worker="drain", limit=batch):
        await handle(claims)
    assert handled == [100, *range(1, 8)]
