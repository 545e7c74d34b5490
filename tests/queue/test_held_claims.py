"""Attacks on claim_many leaving the messages an open transaction holds (Queue.hold_pending)
for later: ordering keys, exactly once, concurrent claimers, aborted holders, malformed
documents, many held messages and the claim's budget, and the consumer during a long hold.
Written by an adversarial review of the change; the failures it found are fixed."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts import mongo
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.consumer import Consumer, Delivery, ack_all
from shared_contracts.queue.engine import Queue
from tests.queue.conftest import FAST, Job
from tests.queue.test_batches import (
    _noop,
    _noop_batch,
    _states,
    counting,
    held_by_an_open_transaction,
)
from tests.support import eventually


async def _ack(queue: Queue, claims: list[Any]) -> None:
    async def ack(session: AsyncClientSession) -> None:
        await queue.ack_many(claims, session=session)

    if claims:
        await in_transaction(queue.collection.database.client, ack)
        await queue.promote_after(claims)


async def test_a_malformed_document_after_a_split_strands_nothing_the_claim_committed(
    jobs: Queue,
) -> None:
    """A claim cut up around a held message commits part by part: a malformed document failing
    a later part lost the claims of the parts before it, left active under a token nobody
    holds, as test_a_malformed_document_does_not_strand_the_rest_of_a_batch guards."""
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(6))
    await jobs.collection.update_one({"n": 4}, {"$set": {"attempts": "x"}})
    queue = Queue(jobs.collection, config=replace(FAST, lease_seconds=60), types=jobs.types)
    consumer = Consumer(queue, _noop, batch_handler=_noop_batch, batch_size=10)
    async with held_by_an_open_transaction(queue, ["k0"]):
        got = await asyncio.wait_for(consumer._try_claim(), timeout=20)
        states = await _states(jobs)
    stranded = [n for n, status, _ in states if status == "active"]
    assert got or stranded == [], (got, states)


async def test_ordering_a_later_message_of_a_held_key_is_not_handed_out(jobs: Queue) -> None:
    """a0 held (pending), a1 unparked by a racing promote: a1 must be parked, not claimed."""
    await jobs.publish(Job(n=0, key="a"))
    await jobs.publish(Job(n=1, key="a"))  # parked behind a0
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(2, 8))
    now = jobs.clock()
    await jobs.collection.update_one({"n": 1}, {"$set": {"availableAt": now}})
    async with held_by_an_open_transaction(jobs, ["a"]):
        claims = await asyncio.wait_for(jobs.claim_many(worker="w", limit=10), timeout=20)
        assert 1 not in {c.document["n"] for c in claims}
        assert 0 not in {c.document["n"] for c in claims}
        await _ack(jobs, claims)
        assert await jobs.claim_many(worker="w", limit=10) == []
    (late,) = await jobs.claim_many(worker="w", limit=10)
    assert late.document["n"] == 0
    await _ack(jobs, [late])
    (later,) = await jobs.claim_many(worker="w", limit=10)
    assert later.document["n"] == 1


async def test_ordering_two_of_a_key_split_across_halves(jobs: Queue) -> None:
    """b0, b1 of one key both claimable (b1 unparked by a race) on either side of a split."""
    await jobs.publish(Job(n=0, key="held"))
    await jobs.publish(Job(n=1, key="b"))
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(2, 6))
    await jobs.publish(Job(n=6, key="b"))  # parked
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(7, 9))
    # b1 first in availableAt order, b0 late: they land in different halves
    now = jobs.clock()
    await jobs.collection.update_one({"n": 6}, {"$set": {"availableAt": now - timedelta(days=1)}})
    async with held_by_an_open_transaction(jobs, ["held"]):
        claims = await asyncio.wait_for(jobs.claim_many(worker="w", limit=20), timeout=20)
        ns = {c.document["n"] for c in claims}
        assert not ({1, 6} <= ns), ns
        assert 6 not in ns
        assert 0 not in ns


async def test_a_holder_that_aborts_leaves_the_message_claimable(jobs: Queue) -> None:
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(4))
    started, release = asyncio.Event(), asyncio.Event()

    async def batch(session: AsyncClientSession) -> None:
        await jobs.hold_pending(["k0"], session=session)
        started.set()
        await release.wait()
        raise RuntimeError("abort")

    holder = asyncio.create_task(in_transaction(jobs.collection.database.client, batch))
    await started.wait()
    claims = await asyncio.wait_for(jobs.claim_many(worker="w", limit=10), timeout=20)
    assert sorted(c.document["n"] for c in claims) == [1, 2, 3]
    release.set()
    with contextlib.suppress(RuntimeError):
        await holder
    (late,) = await jobs.claim_many(worker="w", limit=10)
    assert late.document["n"] == 0
    assert jobs.held_elsewhere == 0


async def test_a_held_message_dead_lettered_meanwhile_is_not_claimed(jobs: Queue) -> None:
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(4))
    async with held_by_an_open_transaction(jobs, ["k0"]) as session:
        claims = await jobs.claim_many(worker="w", limit=10)
        assert jobs.held_elsewhere == 1
        await jobs.collection.update_one({"n": 0}, {"$set": {"status": "dead"}}, session=session)
    assert await jobs.claim_many(worker="w", limit=10) == []
    assert jobs.held_elsewhere == 0
    assert len(claims) == 3


async def test_concurrent_claims_on_one_queue_and_two_instances_claim_each_once(
    jobs: Queue,
) -> None:
    n_msgs = 60
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(n_msgs))
    other = Queue(jobs.collection, config=FAST, types=jobs.types)
    seen: list[int] = []

    async def worker(queue: Queue, name: str, rounds: int) -> None:
        for _ in range(rounds):
            claims = await queue.claim_many(worker=name, limit=7)
            seen.extend(c.document["n"] for c in claims)
            await _ack(queue, claims)
            await asyncio.sleep(0)

    async with held_by_an_open_transaction(jobs, [f"k{n}" for n in range(0, n_msgs, 5)]):
        await asyncio.wait_for(
            asyncio.gather(worker(jobs, "a", 15), worker(jobs, "b", 15), worker(other, "c", 15)),
            timeout=60,
        )
        assert not set(seen) & set(range(0, n_msgs, 5))
    for _ in range(20):
        await worker(jobs, "a", 1)
        await worker(other, "c", 1)
    assert sorted(seen) == list(range(n_msgs)), sorted(seen)


async def test_a_spent_budget_does_not_walk_the_whole_queue(jobs: Queue, mongo_uri: str) -> None:
    """Past the budget every further candidate was marked held without a try, and the claim
    went on finding (room at a time, its $nin growing past MAX_IN_IDS) to the queue's end."""
    total = 600
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(total))
    held_keys = [f"k{n}" for n in range(0, 40, 2)]
    async with (
        counting(jobs, mongo_uri) as (queue, commands),
        held_by_an_open_transaction(queue, held_keys),
    ):
        claims = await asyncio.wait_for(queue.claim_many(worker="w", limit=10), timeout=60)
        finds = commands.count("find")
        assert claims
        assert queue.held_elsewhere <= 40, queue.held_elsewhere
        assert finds < 100, finds


async def test_many_held_messages_starve_none_of_the_others(jobs: Queue) -> None:
    """With half the queue held, the claims that spent their budget marked the untried ones
    held, and retried the held ones first with the whole budget: from the fifth claim on
    nothing was claimed until the hold ended."""
    total = 120
    await jobs.publish_many(Job(n=n, key=f"k{n}") for n in range(total))
    held = set(range(0, total, 2))
    seen: list[int] = []
    async with held_by_an_open_transaction(jobs, [f"k{n}" for n in held]):
        for _ in range(30):
            claims = await jobs.claim_many(worker="w", limit=25)
            seen.extend(c.document["n"] for c in claims)
            await _ack(jobs, claims)
        during = set(seen)
        assert not during & held
        assert during == set(range(total)) - held, sorted(set(range(total)) - held - during)
    for _ in range(30):
        claims = await jobs.claim_many(worker="w", limit=25)
        seen.extend(c.document["n"] for c in claims)
        await _ack(jobs, claims)
    assert sorted(seen) == list(range(total))


@pytest.mark.parametrize("streams", [True, False], ids=["change-stream", "polling"])
@pytest.mark.parametrize("n_held", [1, 12])
async def test_consumer_keeps_handling_others_during_a_long_hold(
    jobs: Queue, streams: bool, n_held: int
) -> None:
    config = replace(FAST, poll_interval_seconds=30, use_change_streams=streams)
    queue = Queue(jobs.collection, config=config, types=jobs.types)
    await queue.publish_many(Job(n=n, key=f"h{n}") for n in range(n_held))
    seen: list[int] = []

    async def handle_batch(deliveries: list[Delivery]) -> None:
        async def apply(session: AsyncClientSession) -> None:
            await ack_all(deliveries, session=session)

        await in_transaction(queue.collection.database.client, apply)
        seen.extend(d.message.n for d in deliveries if isinstance(d.message, Job))

    consumer = Consumer(queue, _noop, batch_handler=handle_batch, batch_size=10)
    running: asyncio.Task[None] | None = None
    try:
        async with held_by_an_open_transaction(queue, [f"h{n}" for n in range(n_held)]):
            running = asyncio.create_task(consumer.run())
            for wave in range(4):  # others keep arriving during a long hold
                base = 100 + 20 * wave
                await queue.publish_many(Job(n=n, key=f"k{n}") for n in range(base, base + 20))

                async def all_of_wave(base: int = base) -> bool:
                    return set(range(base, base + 20)) <= set(seen)

                await eventually(all_of_wave, within=10)
            assert not set(seen) & set(range(n_held))

        async def held_ones_done() -> bool:
            return set(range(n_held)) <= set(seen)

        await eventually(held_ones_done, within=10)
    finally:
        consumer.stop(grace_seconds=1)
        if running is not None:
            await running
    assert len(seen) == len(set(seen)), seen


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    keys=st.lists(st.sampled_from([None, "a", "b", "c", "d", "e"]), min_size=1, max_size=30),
    held=st.sets(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=3),
    limit=st.integers(2, 8),
    workers=st.integers(1, 3),
    shared=st.booleans(),
    abort=st.booleans(),
)
async def test_random_holds_keep_order_and_exactly_once(
    jobs: Queue,
    keys: list[str | None],
    held: set[str],
    limit: int,
    workers: int,
    shared: bool,
    abort: bool,
) -> None:
    """Random keys, held keys, claim sizes, claimers on one Queue or several, holders that
    commit or abort: one message of a key at a time, in publish order, each exactly once,
    nothing of a held key while it is held. (Limit 1 is claim(), which waits for a holder on
    a queue whose messages are not held by their publisher: Job's.)"""
    await mongo.delete_many(jobs.collection, {})
    await jobs.publish_many(Job(n=n, key=k) for n, k in enumerate(keys))
    queues = [
        jobs if shared else Queue(jobs.collection, config=FAST, types=jobs.types)
        for _ in range(workers)
    ]
    handed: list[int] = []
    active: dict[str, int] = {}
    violations: list[str] = []
    by_n = dict(enumerate(keys))

    async def round_(queue: Queue, name: str) -> None:
        claims = await queue.claim_many(worker=name, limit=limit)
        for c in claims:
            k = c.document.get("orderingKey")
            if k is not None:
                if k in active:
                    violations.append(f"{k}: {active[k]} and {c.document['n']} at once")
                active[k] = c.document["n"]
        handed.extend(c.document["n"] for c in claims)
        await asyncio.sleep(0)
        for c in claims:
            active.pop(c.document.get("orderingKey"), None)
        await _ack(queue, claims)

    started, release = asyncio.Event(), asyncio.Event()

    async def batch(session: AsyncClientSession) -> None:
        await jobs.hold_pending(sorted(held), session=session)
        started.set()
        await release.wait()
        if abort:
            raise RuntimeError("abort")

    holder = asyncio.create_task(in_transaction(jobs.collection.database.client, batch))
    await started.wait()
    for _ in range(6):
        await asyncio.wait_for(
            asyncio.gather(*(round_(q, f"w{i}") for i, q in enumerate(queues))), timeout=60
        )
    during = list(handed)
    release.set()
    with contextlib.suppress(RuntimeError):
        await holder
    for _ in range(40):
        await asyncio.gather(*(round_(q, f"w{i}") for i, q in enumerate(queues)))
    assert not violations, violations
    assert sorted(handed) == list(range(len(keys))), (sorted(handed), keys, held)
    # within a key, handed in publish order
    for k in set(keys) - {None}:
        ns = [n for n in handed if by_n[n] == k]
        assert ns == sorted(ns), (k, ns)
    # nothing of a held key while it was held
    assert not [n for n in during if by_n[n] in held], (during, held)


async def test_a_worker_killed_in_the_middle_of_a_cut_up_claim_loses_nothing(
    jobs: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after some parts of a cut-up claim committed and before the claim returned: those
    claims are nobody's until their lease expires; the reaper returns them, and every message
    is claimed again, none left active."""
    queue = Queue(jobs.collection, config=replace(FAST, lease_seconds=0.5), types=jobs.types)
    await queue.publish_many(Job(n=n, key=f"k{n}") for n in range(20))
    real, calls = Queue._claim_in_one_transaction, 0

    async def killed_on_the_third(self: Queue, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise asyncio.CancelledError  # the process dies here
        await real(self, *args, **kwargs)

    monkeypatch.setattr(Queue, "_claim_in_one_transaction", killed_on_the_third)
    # The whole claim meets k19, its first half commits, the worker dies on the second.
    async with held_by_an_open_transaction(queue, ["k19"]):
        with contextlib.suppress(asyncio.CancelledError):
            await queue.claim_many(worker="doomed", limit=20)
    monkeypatch.setattr(Queue, "_claim_in_one_transaction", real)
    assert calls == 3
    stranded = [n for n, status, _ in await _states(jobs) if status == "active"]
    assert stranded  # a part had committed
    await asyncio.sleep(0.6)
    survivor = Queue(jobs.collection, config=FAST, types=jobs.types)
    assert await survivor.reap() == len(stranded)
    seen: list[int] = []
    while claims := await survivor.claim_many(worker="survivor", limit=20):
        seen += [c.document["n"] for c in claims]
        await _ack(survivor, claims)
    assert sorted(seen) == list(range(20))
    assert [s for _, s, _ in await _states(jobs) if s != "done"] == []
