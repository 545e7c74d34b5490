"""Attacks on claims that park: messages available behind an unfinished earlier one of their
key (a publish race, an operator's retry) are parked by the claim that finds them, and the claim
looks again (0832b24); a park takes the key's whole available backlog with it. Written by an
adversarial review of 0832b24: the first two failed on it (a drain ended after PARK_ROUNDS
rounds with a message claimable; a claim over 150 blocked messages of one key read the key's
unfinished messages twice per message and ran past its lease)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared_contracts import mongo
from shared_contracts.queue import engine
from shared_contracts.queue.documents import DONE, PARKED
from shared_contracts.queue.engine import Queue
from tests.queue.conftest import FAST, Job
from tests.queue.test_ordering_races import HookedCollection, publish_at


async def _make_available(jobs: Queue, query: dict[str, Any], seconds_ago: float) -> None:
    await mongo.update_many(
        jobs.collection,
        query,
        {"$set": {"availableAt": datetime.now(UTC) - timedelta(seconds=seconds_ago)}},
    )


async def _blocked_behind_a_slow_first(jobs: Queue, blocked: int) -> Any:
    """a's first message in progress; ``blocked`` later ones of a raced past the publish check
    (available, older than b's message); then b's message, free."""
    await jobs.publish(Job(n=0, key="a"))
    first = await jobs.claim(worker="slow")
    assert first is not None
    await publish_at(
        jobs,
        datetime.now(UTC) - timedelta(seconds=20),
        *[Job(n=n, key="a") for n in range(1, blocked + 1)],
    )
    await jobs.publish(Job(n=100_000, key="b"))
    return first


@pytest.mark.parametrize("batch", [1, 2])
async def test_a_drain_reaches_a_free_message_behind_more_than_park_rounds_blocked(
    jobs: Queue, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """PARK_ROUNDS*batch+1 blocked messages of key a ahead of b's free one. drain() must not end
    while b is claimable. (PARK_ROUNDS lowered to 20 to keep it fast; with the real 500 and 501
    blocked the same drain ended after ~70 s of one claim() call, b untouched.)"""
    monkeypatch.setattr(engine, "PARK_ROUNDS", 20)
    await _blocked_behind_a_slow_first(jobs, 20 * batch + 1)
    handled: list[int] = []
    while claims := await jobs.claim_many(worker="drain", limit=batch):
        for claim in claims:
            handled.append(claim.document["n"])
            await jobs.ack(claim)
    b = await jobs.collection.find_one({"n": 100_000})
    assert b is not None
    assert handled == [100_000], f"drain ended; b is {b['status']}, available {b['availableAt']}"


async def test_one_claim_over_a_keys_blocked_backlog_reads_the_key_a_few_times(
    jobs: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """150 blocked messages of one key ahead of a free one: one claim() parked them one by one,
    each park reading every unfinished message of the key twice (behind check + promote), a
    cost that grew with the square of the backlog (9-10 s here, past the 5 s lease). The first
    park now takes the whole backlog: a few reads of the key, whatever its size."""
    await _blocked_behind_a_slow_first(jobs, 150)
    reads = 0
    unfinished = jobs._unfinished

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += "session" not in kwargs  # one look-up reads in a snapshot of its own, nested
        return await unfinished(*args, **kwargs)

    monkeypatch.setattr(jobs, "_unfinished", counted)
    claim = await jobs.claim(worker="w")
    assert claim is not None
    assert claim.document["n"] == 100_000
    assert reads <= 4, reads  # a: the behind check, the backlog parked, the promotion; b
    parked = await jobs.collection.count_documents({"availableAt": PARKED})
    assert parked == 150


async def test_a_park_racing_the_ack_of_the_earlier_message_leaves_nothing_parked(
    jobs: Queue,
) -> None:
    """Worker A claims m1 (available early, a publish race) and reads a's unfinished messages:
    m0 active. Between A's reads, the holder of m0 acks it (its promotion finds nothing parked:
    m1 is active with A). A then parks m1: m1 must not stay parked forever."""
    await jobs.publish(Job(n=0, key="a"))
    first = await jobs.claim(worker="slow")
    assert first is not None
    await publish_at(jobs, datetime.now(UTC) - timedelta(seconds=5), Job(n=1, key="a"))
    hooked = HookedCollection(jobs.collection)
    worker_a = Queue(hooked, config=FAST, types=jobs.types)  # type: ignore[arg-type]

    async def ack_m0() -> None:
        assert await jobs.ack(first)

    hooked.hook = ack_m0
    got = await worker_a.claim(worker="A")
    assert hooked.hook is None
    handled = [got.document["n"]] if got else []
    if got:
        await jobs.ack(got)
    while claims := await jobs.claim_many(worker="w", limit=3):
        for claim in claims:
            handled.append(claim.document["n"])
            await jobs.ack(claim)
    left = await jobs.collection.find({"status": {"$ne": DONE}}).to_list()
    assert handled == [1], handled
    assert left == [], left


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_racing_workers_with_parks_keep_order_and_leave_nothing_parked(
    jobs: Queue, batch: int, seed: int
) -> None:
    """Bulk publishes (no look-up) of 6 keys x 6 messages, claimable in shuffled order; three
    workers claim and ack concurrently (acks inside and outside transactions). Per key, one
    active at a time, handled in publish order; at the end nothing is parked or pending."""
    rnd = random.Random(seed)
    now = datetime.now(UTC)
    messages = [(k, n) for k in range(6) for n in range(6)]
    for k, n in messages:  # publish order per key is n (time_ns), availability shuffled
        await publish_at(
            jobs, now - timedelta(seconds=rnd.uniform(1, 30)), Job(n=k * 100 + n, key=f"k{k}")
        )
    handled: dict[str, list[int]] = {}
    violations: list[str] = []
    in_hand: dict[str, Any] = {}
    workers = [Queue(jobs.collection, config=FAST, types=jobs.types) for _ in range(3)]

    async def work(queue: Queue, name: str) -> None:
        idle = 0
        while idle < 3:
            claims = await queue.claim_many(worker=name, limit=batch)
            if not claims:
                idle += 1
                await queue.reap()
                await asyncio.sleep(0.02)
                continue
            idle = 0
            for claim in claims:
                key = claim.document["orderingKey"]
                if (before := in_hand.get(key)) is not None:  # another of its key handed out:
                    earlier = await jobs.collection.find_one({"n": before})  # must be done now
                    if earlier is None or earlier["status"] != DONE:
                        violations.append(
                            f"{key}: {claim.document['n']} while {before} "
                            f"{earlier and earlier['status']}"
                        )
                in_hand[key] = claim.document["n"]
                handled.setdefault(key, []).append(claim.document["n"])
                await asyncio.sleep(rnd.uniform(0, 0.005))
                if rnd.random() < 0.5:

                    async def inside(session: Any, claim: Any = claim) -> None:
                        await queue.ack(claim, session=session)

                    await mongo.in_transaction(jobs.collection.database.client, inside)
                    await queue.promote_after([claim])
                else:
                    await queue.ack(claim)
                in_hand[key] = None

    await asyncio.wait_for(asyncio.gather(*(work(q, f"w{i}") for i, q in enumerate(workers))), 90)
    left = await jobs.collection.find({"status": {"$ne": DONE}}).to_list()
    assert violations == []
    assert left == [], [(d["n"], d["status"], d["availableAt"] == PARKED) for d in left]
    for key, ns in handled.items():
        assert ns == sorted(ns), (key, ns)
    assert sum(len(v) for v in handled.values()) == 36


async def test_a_round_that_parks_and_meets_a_held_message_does_not_end_the_drain(
    jobs: Queue,
) -> None:
    """claim_many(limit=2): the oldest available are a1 (behind a0, in progress) and h0 (held by
    an open watcher-batch transaction); b0 is free behind them. The round parks a1, leaves h0
    held, claims nothing, and the loop returns [] because something is held: the drain ends
    while b0 is claimable."""
    from tests.queue.test_batches import held_by_an_open_transaction

    await jobs.publish(Job(n=0, key="a"))
    first = await jobs.claim(worker="slow")
    assert first is not None
    old = datetime.now(UTC)
    await publish_at(jobs, old - timedelta(seconds=30), Job(n=1, key="a"))
    await publish_at(jobs, old - timedelta(seconds=20), Job(n=2, key="h"))
    await publish_at(jobs, old - timedelta(seconds=10), Job(n=3, key="b"))
    handled: list[int] = []
    async with held_by_an_open_transaction(jobs, ["h"]):
        while claims := await asyncio.wait_for(jobs.claim_many(worker="w", limit=2), 20):
            for claim in claims:
                handled.append(claim.document["n"])
                await jobs.ack(claim)
    assert 3 in handled, f"drain ended with b0 claimable; handled {handled}"


async def test_a_claim_that_dies_while_parking_a_keys_backlog_loses_no_order(
    jobs: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies between parking the found message and parking the rest of its key
    (the database goes away there): what stayed available is parked by the next claim that
    finds it, and the key still goes in publish order, nothing lost or stuck."""
    first = await _blocked_behind_a_slow_first(jobs, 6)
    real = mongo.update_all

    async def dies(*args: Any, **kwargs: Any) -> int:
        raise ConnectionError("killed mid-park")

    monkeypatch.setattr(mongo, "update_all", dies)
    with pytest.raises(ConnectionError):
        await jobs.claim(worker="doomed")
    monkeypatch.setattr(mongo, "update_all", real)
    handled: list[int] = []
    while claims := await jobs.claim_many(worker="drain", limit=2):
        for claim in claims:
            handled.append(claim.document["n"])
            await jobs.ack(claim)
    assert handled == [100_000]
    await jobs.ack(first)
    for _ in range(7):
        while claims := await jobs.claim_many(worker="drain", limit=2):
            for claim in claims:
                handled.append(claim.document["n"])
                await jobs.ack(claim)
    assert handled == [100_000, *range(1, 7)]
    assert await jobs.collection.count_documents({"status": {"$ne": DONE}}) == 0
