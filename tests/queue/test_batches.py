"""Claiming and handling messages in batches: claim_many, ack_many, the batch consumer.

A batch is claimed under one token in four commands, keeps ordering keys, is acked in the
handler's transaction all or nothing, and a batch that fails is handled one message at a
time, so one bad message fails alone."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from bson import Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts import mongo
from shared_contracts.messages import ScoreRefresh, score_refresh_key
from shared_contracts.mongo import MAX_IN_IDS, in_transaction, make_client
from shared_contracts.queue.consumer import Consumer, Delivery, ack_all
from shared_contracts.queue.documents import PARKED
from shared_contracts.queue.engine import CLAIM_TRANSACTIONS, LeaseLost, Queue
from tests.queue.conftest import FAST, Job
from tests.support import SeenCommands, SeenFilters, assert_planned_on_an_index, eventually


@contextlib.asynccontextmanager
async def counting(jobs: Queue, mongo_uri: str) -> AsyncIterator[tuple[Queue, SeenCommands]]:
    """The same queue through a client of its own whose commands are recorded."""
    commands = SeenCommands()
    client: Any = make_client(mongo_uri, app_name="batches", event_listeners=[commands])
    try:
        database = client[jobs.collection.database.name]
        yield Queue(database[jobs.name], config=FAST, types=jobs.types), commands
    finally:
        await client.close()


async def test_a_batch_is_claimed_in_four_commands_in_arrival_order(
    jobs: Queue, mongo_uri: str
) -> None:
    await jobs.publish_many(Job(n=n) for n in range(30))
    async with counting(jobs, mongo_uri) as (queue, commands):
        claims = await queue.claim_many(worker="w", limit=20)
        # ids, then one transaction: the claim, the claimed documents read back
        assert commands.names() == ["find", "update", "find", "commitTransaction"]
        assert [c.document["n"] for c in claims] == list(range(20))
        assert len({c.token for c in claims}) == 1
        rest = await queue.claim_many(worker="w", limit=20)
        assert [c.document["n"] for c in rest] == list(range(20, 30))
        assert await queue.claim_many(worker="w", limit=20) == []


async def test_the_ordering_check_of_a_batch_shares_the_claim_s_commit(
    jobs: Queue, mongo_uri: str
) -> None:
    """Messages with ordering keys: the check reads the unfinished ones of their keys (one read
    per status) inside the claim's transaction, after its write (the claim's first statement,
    which races a watcher batch's hold), not in a snapshot of its own. The claimed messages are
    among the active ones it reads: no read-back."""
    await jobs.publish_many(Job(n=n, key=f"k{n % 3}") for n in range(6))
    async with counting(jobs, mongo_uri) as (queue, commands):
        claims = await queue.claim_many(worker="w", limit=10)
        assert sorted(c.document["n"] for c in claims) == [0, 1, 2]  # the first of each key
        claim_commands = commands.names()[: commands.names().index("commitTransaction") + 1]
        # ids; then the claim, the check (active, pending) and the one commit
        assert claim_commands == ["find", "update", "find", "find", "commitTransaction"]
        assert all(c.document["status"] == "active" and "attempts" in c.document for c in claims)


async def test_a_batch_of_refreshes_is_claimed_in_four_commands(
    events: Queue, mongo_uri: str
) -> None:
    """A refresh's ordering key is its dedupe key: it was its user's only pending message, so
    the check reads only the active ones of its users, which hold the claimed refreshes whole."""
    await events.publish_many(
        ScoreRefresh(userId=f"u{n}", username=None, reason="ingest", projectionVersion=1 + n,
                     snapshot={"n": n})
        for n in range(5)
    )  # fmt: skip
    async with counting(events, mongo_uri) as (queue, commands):
        claims = await queue.claim_many(worker="w", limit=10)
        assert commands.names() == ["find", "update", "find", "commitTransaction"]
    assert sorted(c.document["snapshot"]["n"] for c in claims) == list(range(5))
    assert {c.document["claimToken"] for c in claims} == {claims[0].token}
    assert [c.document["availableAt"] for c in claims] == sorted(
        c.document["availableAt"] for c in claims
    )


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


async def test_every_ordering_look_up_is_planned_on_an_index(jobs: Queue, mongo_uri: str) -> None:
    """Publishing behind an unfinished message, claiming one and many, parking, promoting: the
    embedded server plans equality fields and one $in or range on an index without a partial
    filter only; on the partial (orderingKey, orderSeq) index it read every message a key ever
    had, done ones included (7 days of a user's score refreshes, for every claim)."""
    seen = SeenFilters()
    client: Any = make_client(mongo_uri, app_name="ordering", event_listeners=[seen])
    try:
        queue = Queue(client[jobs.collection.database.name][jobs.name], config=FAST,
                      types=jobs.types)  # fmt: skip
        await queue.publish(Job(n=0, key="a"))
        first = await queue.claim(worker="other")
        assert first is not None
        await queue.publish(Job(n=1, key="a"))  # behind an unfinished one: parked
        await queue.publish_many([Job(n=2, key="b"), Job(n=3, key="b")])
        claims = await queue.claim_many(worker="w", limit=10)  # n=3 parked behind n=2
        assert [c.document["n"] for c in claims] == [2]
        await in_transaction(client, lambda session: queue.ack_many(claims, session=session))
        await queue.promote_after(claims)
        await queue.ack(first)  # promotes n=1
        await queue.reap()
    finally:
        await client.close()
    ordering = [query for _, query in seen.filters if "orderingKey" in query]
    assert len(ordering) >= 5, seen.filters  # the checks above did run
    for query in ordering:
        await assert_planned_on_an_index(jobs.collection.database, jobs.name, query)


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
    await mongo.delete_many(jobs.collection, {})
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


def failing_batch_consumer(queue: Queue, handle: Any, *, batch_size: int = 4) -> Consumer:
    async def handle_batch(deliveries: list[Delivery]) -> None:
        raise RuntimeError("the batch fails; fall back to one at a time")

    return Consumer(queue, handle, batch_handler=handle_batch, batch_size=batch_size)


async def test_graceful_stop_during_fallback_releases_every_claim_of_the_batch(
    jobs: Queue,
) -> None:
    """Found by attacking batches: stop() released only the message being handled in a
    failed batch's one-at-a-time fallback; the rest stayed active until their lease ran out,
    their attempt counted."""
    await jobs.publish_many(Job(n=n) for n in range(4))
    started = asyncio.Event()

    async def never_finishes(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    queue = Queue(jobs.collection, config=replace(FAST, lease_seconds=60), types=jobs.types)
    consumer = failing_batch_consumer(queue, never_finishes)
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(started.wait(), 20)
    consumer.stop(grace_seconds=0.2)
    await asyncio.wait_for(task, 20)
    states = sorted([(d["n"], d["status"], d["attempts"]) async for d in jobs.collection.find({})])
    assert states == [(n, "pending", 0) for n in range(4)], states


async def test_fallback_keeps_the_leases_of_the_messages_still_waiting(jobs: Queue) -> None:
    """Found by attacking batches: while the fallback handled a failed batch one message at a
    time, the messages waiting their turn were not renewed: they expired, were reaped and
    handed out again while this worker still held them (handled twice)."""
    await jobs.publish_many(Job(n=n) for n in range(4))
    calls: collections.Counter[int] = collections.Counter()
    queue = Queue(jobs.collection, config=replace(FAST, lease_seconds=1.0), types=jobs.types)

    async def slow(delivery: Delivery) -> None:
        assert isinstance(delivery.message, Job)
        calls[delivery.message.n] += 1
        await asyncio.sleep(0.7)  # well within its own lease (renewed every 0.25 s)

        async def ack(session: AsyncClientSession) -> None:
            await delivery.ack(session=session)

        await in_transaction(queue.collection.database.client, ack)

    consumer = failing_batch_consumer(queue, slow)
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: _count(jobs, {"status": "done"}, 4), within=30)
    finally:
        consumer.stop(grace_seconds=5)
        await task
    assert calls == collections.Counter({n: 1 for n in range(4)}), calls


async def test_drain_goes_on_past_a_batch_that_was_all_parked(jobs: Queue) -> None:
    """drain() handles messages until none is available; a claim whose messages were all
    parked behind another worker's is not 'none available'."""
    await jobs.publish(Job(n=0, key="a"))
    assert len(await jobs.claim_many(worker="other", limit=1)) == 1  # job 0 held
    await jobs.publish_many([Job(n=1, key="a"), Job(n=2, key="a"), Job(n=3)])
    seen: list[int] = []

    async def handle(delivery: Delivery) -> None:
        assert isinstance(delivery.message, Job)
        seen.append(delivery.message.n)

    async def handle_batch(deliveries: list[Delivery]) -> None:
        async def ack(session: AsyncClientSession) -> None:
            await ack_all(deliveries, session=session)

        await in_transaction(jobs.collection.database.client, ack)
        seen.extend(d.message.n for d in deliveries if isinstance(d.message, Job))

    consumer = Consumer(jobs, handle, batch_handler=handle_batch, batch_size=2)
    await consumer.drain()
    assert seen == [3], (seen, await _states(jobs))


async def test_a_malformed_document_does_not_strand_the_rest_of_a_batch(jobs: Queue) -> None:
    """Found by attacking batches: a claim that fails on a malformed document sweeps it aside,
    but the good messages the same update_many claimed before it failed stayed active under a
    token nobody held (a lease lost, an attempt spent)."""
    await jobs.publish_many(Job(n=n) for n in range(6))
    await jobs.collection.update_one({"n": 4}, {"$set": {"attempts": "x"}})
    queue = Queue(jobs.collection, config=replace(FAST, lease_seconds=60), types=jobs.types)
    consumer = Consumer(queue, _noop, batch_handler=_noop_batch, batch_size=10)
    assert await consumer._try_claim() == []  # the claim failed; malformed swept
    states = await _states(jobs)
    stranded = [n for n, status, _ in states if status == "active"]
    assert stranded == [], states


async def _noop(delivery: Delivery) -> None:
    pass


async def _noop_batch(deliveries: list[Delivery]) -> None:
    pass


async def _states(queue: Queue) -> list[tuple[Any, ...]]:
    return sorted(
        [(d["n"], d["status"], d.get("availableAt")) async for d in queue.collection.find({})]
    )


async def _count(queue: Queue, query: dict[str, Any], n: int) -> bool:
    return await queue.collection.count_documents(query) == n


async def test_two_parks_racing_keep_the_newest_refresh(events: Queue) -> None:
    """Found by a helper attacking batches (the race is older than them): r2 and r3 of one
    user are both claimed behind r1 and parked. r2 parked first; r3's park hit the unique
    pending index and was finished as 'superseded', though the pending r2 was OLDER: the
    user's score stayed at v2 until the user's next event (the stale-score defect). Now the
    older payload gives way."""

    def refresh(v: int) -> ScoreRefresh:
        return ScoreRefresh(userId="u1", username=None, reason="ingest", projectionVersion=v,
                            snapshot={"activeDays": v})  # fmt: skip

    b = Queue(events.collection, config=events.config, types=events.types)
    c = Queue(events.collection, config=events.config, types=events.types)
    gates = {id(b): asyncio.Event(), id(c): asyncio.Event()}
    parking = {id(b): asyncio.Event(), id(c): asyncio.Event()}
    original = Queue._park

    async def gated_park(self: Queue, claim: Any) -> None:
        parking[id(self)].set()
        await gates[id(self)].wait()
        await original(self, claim)

    b._park = gated_park.__get__(b)  # type: ignore[method-assign]
    c._park = gated_park.__get__(c)  # type: ignore[method-assign]

    await events.publish(refresh(1))
    (r1,) = await events.claim_many(worker="a", limit=10)  # worker A handles v1
    await events.publish(refresh(2))
    b_claim = asyncio.create_task(b.claim_many(worker="b", limit=10))
    await parking[id(b)].wait()  # r2 is active (claimed by B), about to be parked
    await events.publish(refresh(3))  # no pending one to coalesce into: a new message
    c_claim = asyncio.create_task(c.claim_many(worker="c", limit=10))
    await parking[id(c)].wait()  # r3 is active (claimed by C), about to be parked
    gates[id(b)].set()
    assert await b_claim == []  # r2 parked
    gates[id(c)].set()
    assert await c_claim == []  # r3 "parked"... or superseded by r2
    await events.ack(r1)  # A finishes v1; the next in line is promoted
    waiting = await events.collection.find(
        {"userId": "u1", "status": "pending"}, {"projectionVersion": 1, "supersededAt": 1}
    ).to_list()
    r3 = await events.collection.find_one({"projectionVersion": 3})
    assert r3 is not None
    assert [w["projectionVersion"] for w in waiting] == [3], (waiting, r3["status"],
                                                              r3.get("supersededAt"))  # fmt: skip


async def test_a_message_whose_attempts_cannot_grow_is_swept_aside_not_blocking_the_queue(
    jobs: Queue,
) -> None:
    """Found by attack: attempts at the int64 maximum make every claim's $inc fail, and no
    malformed-document query matched it, so the claims at the front of the queue failed
    forever."""
    await jobs.publish_many(Job(n=n) for n in range(4))
    await jobs.collection.update_one({"n": 2}, {"$set": {"attempts": Int64(2**63 - 1)}})
    queue = Queue(jobs.collection, config=replace(FAST, lease_seconds=60), types=jobs.types)
    consumer = Consumer(queue, _noop, batch_handler=_noop_batch, batch_size=10)
    claimed = [len(await consumer._try_claim()) for _ in range(3)]
    assert sum(claimed) == 3, claimed
    assert (await jobs.collection.find_one({"n": 2}) or {})["status"] == "dead"


async def test_a_hold_of_many_keys_sends_bounded_in_lists_and_holds_every_one(
    jobs: Queue, mongo_uri: str
) -> None:
    """A watcher batch behind a backlog may touch thousands of users: the hold's $in is cut
    at MAX_IN_IDS like every other $in of the services (the embedded server's $in cost grows
    faster than its list), in the caller's transaction, and still takes every pending one."""
    count = MAX_IN_IDS + 3
    await jobs.publish_many(Job(n=n, key=f"h{n}") for n in range(count))
    before = {d["_id"]: d["updatedAt"] async for d in jobs.collection.find({})}
    seen = SeenFilters()
    client: Any = make_client(mongo_uri, app_name="holds", event_listeners=[seen])
    try:
        queue = Queue(client[jobs.collection.database.name][jobs.name], config=FAST,
                      types=jobs.types)  # fmt: skip

        async def hold(session: AsyncClientSession) -> None:
            await queue.hold_pending((f"h{n}" for n in range(count)), session=session)

        await in_transaction(client, hold)
    finally:
        await client.close()
    sizes = [len(f["orderingKey"]["$in"]) for _, f in seen.filters if "orderingKey" in f]
    assert max(sizes) <= MAX_IN_IDS
    assert sum(sizes) == count
    after = {d["_id"]: d["updatedAt"] async for d in jobs.collection.find({})}
    assert all(after[i] > before[i] for i in before)


@contextlib.asynccontextmanager
async def held_by_an_open_transaction(
    queue: Queue, keys: list[str]
) -> AsyncIterator[AsyncClientSession]:
    """A watcher batch in the middle of its transaction: it has held the pending messages of
    ``keys`` (hold_pending) and not committed yet. The body runs inside it; it commits after."""
    held, done = asyncio.Event(), asyncio.Event()
    session_seen: list[AsyncClientSession] = []

    async def batch(session: AsyncClientSession) -> None:
        await queue.hold_pending(keys, session=session)
        session_seen.append(session)
        held.set()
        await done.wait()

    holder = asyncio.create_task(in_transaction(queue.collection.database.client, batch))
    await held.wait()
    try:
        yield session_seen[0]
    finally:
        done.set()
        await holder


async def test_a_held_message_does_not_hold_up_the_claim_of_the_others(jobs: Queue) -> None:
    """A claim's write that met a message a watcher batch holds ran its whole transaction
    again, with the driver's backoff, until that batch committed; the other messages of the
    claim waited as long. While one busy user's batches ran back to back, everybody's scores
    waited (a helper's attack: 1.4-7.9 s per claim with 0.2 s batches). The claim takes the
    others now, leaves the held one, and takes it once the batch has committed."""
    await jobs.publish_many([Job(n=0, key="busy"), *(Job(n=n, key=f"k{n}") for n in range(1, 6))])
    async with held_by_an_open_transaction(jobs, ["busy"]):
        # A guard against the old wait (up to the driver's 120 s), not a timing.
        claims = await asyncio.wait_for(jobs.claim_many(worker="w", limit=10), timeout=20)
        assert sorted(c.document["n"] for c in claims) == [1, 2, 3, 4, 5]
        assert jobs.held_elsewhere == 1
        assert await jobs.claim_many(worker="w", limit=10) == []
    (late,) = await jobs.claim_many(worker="w", limit=10)
    assert late.document["n"] == 0
    assert jobs.held_elsewhere == 0


async def test_a_held_message_is_found_once_then_tried_alone(jobs: Queue, mongo_uri: str) -> None:
    """Finding the held message among many costs a few transactions (the claim is split in two
    until it is alone), and the claim still fills up with the next one; the claims after that
    try it alone, in one small transaction, and claim the rest as usual, rather than find it
    again."""
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(40))
    async with (
        counting(jobs, mongo_uri) as (queue, commands),
        held_by_an_open_transaction(queue, ["k0"]),
    ):
        first = await queue.claim_many(worker="w", limit=20)
        assert sorted(c.document["n"] for c in first) == list(range(1, 21))
        assert queue.held_elsewhere == 1
        commands.seen.clear()
        second = await queue.claim_many(worker="w", limit=20)
        assert sorted(c.document["n"] for c in second) == list(range(21, 40))
        # the held one alone (refused), then the rest in one transaction
        assert commands.names().count("update") == 2
        assert commands.names().count("abortTransaction") == 1
    (late,) = await jobs.claim_many(worker="w", limit=20)
    assert late.document["n"] == 0


@pytest.mark.parametrize("streams", [True, False], ids=["change-stream", "polling"])
async def test_a_batch_consumer_handles_a_held_refresh_as_soon_as_its_batch_commits(
    events: Queue, streams: bool
) -> None:
    """The consumer handles everything else meanwhile, then the held refresh with the payload
    the batch published into it: woken by that publish, or looking again soon while something
    is held, rather than after its poll interval."""
    config = replace(FAST, poll_interval_seconds=30, use_change_streams=streams)
    queue = Queue(events.collection, config=config, types=events.types)

    def refresh(user: str, version: int) -> ScoreRefresh:
        snapshot = {"activeDays": version}
        return ScoreRefresh(userId=user, username=None, reason="ingest",
                            projectionVersion=version, snapshot=snapshot)  # fmt: skip

    await queue.publish(refresh("busy", 1))
    seen: list[tuple[str, int]] = []

    async def handle_batch(deliveries: list[Delivery]) -> None:
        async def apply(session: AsyncClientSession) -> None:
            await ack_all(deliveries, session=session)

        await in_transaction(queue.collection.database.client, apply)
        for delivery in deliveries:
            assert isinstance(delivery.message, ScoreRefresh)
            seen.append((delivery.message.userId, delivery.message.projectionVersion))

    async def handled(entry: tuple[str, int]) -> bool:
        return entry in seen

    consumer = Consumer(queue, _noop, batch_handler=handle_batch, batch_size=10)
    running: asyncio.Task[None] | None = None
    try:
        async with held_by_an_open_transaction(queue, [score_refresh_key("busy")]) as session:
            running = asyncio.create_task(consumer.run())  # busy's first refresh is held now
            await queue.publish_many(refresh(f"u{n}", 1) for n in range(3))
            for n in range(3):
                await eventually(lambda n=n: handled((f"u{n}", 1)))  # type: ignore[misc]
            await queue.publish(refresh("busy", 2), session=session)
        await eventually(lambda: handled(("busy", 2)), within=10)
    finally:
        consumer.stop(grace_seconds=1)
        if running is not None:
            await running
    assert ("busy", 1) not in seen


async def test_a_claim_of_one_refresh_does_not_wait_for_a_held_one_either(events: Queue) -> None:
    """SCORE_REFRESH_BATCH_SIZE=1: a claim of one is a single find-and-modify elsewhere, and
    that write would wait for the batch holding the refresh at the head of the queue."""

    def refresh(user: str) -> ScoreRefresh:
        return ScoreRefresh(userId=user, username=None, reason="ingest", projectionVersion=1,
                            snapshot={})  # fmt: skip

    await events.publish(refresh("busy"))
    await events.publish(refresh("other"))
    async with held_by_an_open_transaction(events, [score_refresh_key("busy")]):
        # A guard against waiting for the holder, not a timing.
        (claim,) = await asyncio.wait_for(events.claim_many(worker="w", limit=1), timeout=20)
        assert claim.document["userId"] == "other"
    (late,) = await events.claim_many(worker="w", limit=1)
    assert late.document["userId"] == "busy"


async def test_a_claim_among_many_held_messages_spends_a_bounded_number_of_transactions(
    jobs: Queue, mongo_uri: str
) -> None:
    """A watcher batch over many users holds many refreshes. Cutting a claim up around each of
    them would cost two transactions per held message; past its budget the claim leaves what
    is unsorted as held, and still claims what it has found free."""
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(100))
    held_keys = [f"k{n}" for n in range(0, 100, 3)]  # 34 held, spread through the queue
    async with (
        counting(jobs, mongo_uri) as (queue, commands),
        held_by_an_open_transaction(queue, held_keys),
    ):
        claims = await queue.claim_many(worker="w", limit=100)
        assert commands.count("commitTransaction") + commands.count("abortTransaction") <= 2 * (
            CLAIM_TRANSACTIONS + 2
        )  # each transaction at most twice (CLAIM_ATTEMPTS)
        claimed = {c.document["n"] for c in claims}
        assert claimed
        assert not claimed & {int(k[1:]) for k in held_keys}
    rest = []
    while more := await jobs.claim_many(worker="w", limit=100):
        rest += more
    assert claimed | {c.document["n"] for c in rest} == set(range(100))


async def test_a_refresh_waits_behind_an_earlier_message_of_another_type_of_its_key(
    events: Queue,
) -> None:
    """The claim reads pending messages of a refresh's key only where another type may share
    it: here a message of its key without a dedupe key, published first and waiting out its
    retry's backoff, goes before a refresh of the same key published after it."""
    config = replace(FAST, backoff_base_seconds=60, backoff_max_seconds=60)
    queue = Queue(events.collection, config=config, types={**events.types, "job": Job})
    key = score_refresh_key("u1")
    await queue.publish(Job(n=1, key=key))
    [first] = await queue.claim_many(worker="w", limit=10)
    assert await queue.fail(first, RuntimeError("boom"))  # pending again, after its backoff
    await queue.publish(
        ScoreRefresh(userId="u1", username=None, reason="ingest", projectionVersion=1,
                     snapshot={})
    )  # fmt: skip
    assert await queue.claim_many(worker="w", limit=10) == []


async def test_a_claimed_message_is_handed_out_even_if_its_ordering_key_changed_meanwhile(
    jobs: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claimed messages are picked from the active ones of the keys they were found with;
    one whose key changed in between (an operator's edit) is read back by id, not left active
    and unanswered until its lease runs out."""
    await jobs.publish(Job(n=1, key="k"))
    real = jobs._candidates

    async def candidates(room: int, *, now: Any) -> list[Any]:
        found = await real(room, now=now)
        await mongo.update_all(jobs.collection, {}, {"$unset": {"orderingKey": ""}})
        return found

    monkeypatch.setattr(jobs, "_candidates", candidates)
    claims = await jobs.claim_many(worker="w", limit=10)
    assert [c.document["n"] for c in claims] == [1]
