"""A helper's attack on the publish-then-park fix (e5257a1), kept as a stress test: publishers
(plain and in transactions that sometimes retry) race workers that ack / fail / release /
dead-letter; a key's messages must be handed out one at a time and in each publisher's order,
and nothing may stay parked without the reaper."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure

from shared_contracts import mongo
from shared_contracts.queue.config import QueueConfig
from shared_contracts.queue.documents import DEAD, DONE
from shared_contracts.queue.engine import Queue
from tests.queue.conftest import Job
from tests.queue.test_ordering_races import HookedCollection

CFG = QueueConfig(lease_seconds=30, max_attempts=2, backoff_base_seconds=0.01,
                  backoff_max_seconds=0.05, poll_interval_seconds=0.01, concurrency=4)  # fmt: skip


def conflict() -> OperationFailure:
    error = OperationFailure("write conflict", code=112)
    error._add_error_label("TransientTransactionError")
    return error


@pytest.mark.parametrize("seed", range(3))  # ten passed; three keep make test short
async def test_racing_publishers_and_finishers_keep_each_key_in_order(
    jobs: Queue, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rnd = random.Random(seed)
    real_unfinished, real_unpark = Queue._unfinished, Queue._unpark

    async def slow_unfinished(self: Queue, *args: Any, **kwargs: Any) -> Any:
        found = await real_unfinished(self, *args, **kwargs)
        await asyncio.sleep(rnd.random() * 0.02)  # widen every read-then-act window
        return found

    async def slow_unpark(self: Queue, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(rnd.random() * 0.01)
        return await real_unpark(self, *args, **kwargs)

    monkeypatch.setattr(Queue, "_unfinished", slow_unfinished)
    monkeypatch.setattr(Queue, "_unpark", slow_unpark)
    client = jobs.collection.database.client
    queue = Queue(jobs.collection, config=CFG, types=jobs.types)
    keys = ["a", "b"]
    per_publisher = 12
    # (publisher, index) -> n ; n encodes both
    finished: set[int] = set()
    held: dict[str, int] = {}  # key -> n handed out and not yet given back
    violations: list[str] = []
    publishing_done = asyncio.Event()

    def n_of(pub: int, i: int) -> int:
        return pub * 1000 + i

    async def publisher(pub: int, key: str) -> None:
        for i in range(per_publisher):
            job = Job(n=n_of(pub, i), key=key)
            mode = rnd.choice(["plain", "txn", "txn-retry"])
            if mode == "plain":
                await queue.publish(job)
            else:
                tries = 0

                async def work(
                    session: AsyncClientSession, job: Job = job, mode: str = mode
                ) -> None:
                    nonlocal tries
                    tries += 1
                    await queue.publish(job, session=session)
                    await asyncio.sleep(rnd.random() * 0.01)
                    if mode == "txn-retry" and tries == 1:
                        raise conflict()

                await mongo.in_transaction(client, work)
            await asyncio.sleep(rnd.random() * 0.01)

    async def worker(name: str) -> None:
        idle = 0
        while not (publishing_done.is_set() and idle > 60):
            claims = await queue.claim_many(worker=name, limit=rnd.choice([1, 1, 3]))
            if not claims:
                idle += 1
                await asyncio.sleep(0.01)
                continue
            idle = 0
            for claim in claims:
                n, key = claim.document["n"], claim.ordering_key
                assert key is not None
                if key in held:
                    violations.append(f"{name} got {n} while {held[key]} of {key} is held")
                pub, i = divmod(n, 1000)
                missing = [j for j in range(i) if n_of(pub, j) not in finished]
                if missing:
                    violations.append(f"{name} got {n} before {pub}'s {missing} finished")
                held[key] = n
            await asyncio.sleep(rnd.random() * 0.005)
            for claim in claims:
                n, key = claim.document["n"], claim.ordering_key
                action = rnd.choice(["ack", "ack", "ack-txn", "fail", "release", "dead"])
                if action in ("ack", "ack-txn", "dead"):
                    finished.add(n)
                held.pop(key, None)  # type: ignore[arg-type]
                if action == "ack":
                    ok = await queue.ack(claim)
                elif action == "ack-txn":
                    await mongo.in_transaction(
                        client,
                        lambda s, c=claim: queue.ack(c, session=s),  # type: ignore[misc]
                    )
                    await queue.promote_after([claim])
                    ok = True
                elif action == "fail":
                    ok = await queue.fail(claim, RuntimeError("x"))
                    doc = await queue.collection.find_one({"_id": claim.id})
                    if doc and doc["status"] in (DONE, DEAD):
                        finished.add(n)
                elif action == "release":
                    ok = await queue.release(claim)
                else:
                    ok = await queue.dead_letter(claim, RuntimeError("dead"))
                assert ok, (action, n)

    publishers = [publisher(p, keys[p % len(keys)]) for p in range(4)]

    async def publish_all() -> None:
        await asyncio.gather(*publishers)
        publishing_done.set()

    await asyncio.wait_for(
        asyncio.gather(publish_all(), *(worker(f"w{k}") for k in range(4))), timeout=120
    )
    assert violations == []
    left = await jobs.collection.find({"status": {"$nin": [DONE, DEAD]}}).to_list()
    assert left == [], [(d["n"], d["status"], d["availableAt"]) for d in left]


@pytest.mark.parametrize("finish", ["dead_letter", "ack_in_txn", "fail_to_dead"])
async def test_earlier_finishes_and_a_later_publish_overtakes_during_the_check(
    jobs: Queue, finish: str
) -> None:
    """m0 active. P1's check for m1 reads once; then m0 finishes and P2 publishes m2 (not
    parked: nothing unfinished is visible). P1 then stores m1 parked, behind m2 by time but
    ahead of it by orderSeq. m1 must be handed out first, m2 after, no reaper."""
    client = jobs.collection.database.client
    one_try = Queue(jobs.collection, config=QueueConfig(
        lease_seconds=30, max_attempts=1, backoff_base_seconds=0.01, backoff_max_seconds=0.05,
        poll_interval_seconds=0.01, concurrency=4), types=jobs.types)  # fmt: skip
    await one_try.publish(Job(n=0, key="a"))  # maxAttempts 1: a fail is its death
    first = await one_try.claim(worker="w0")
    assert first is not None
    hooked = HookedCollection(jobs.collection)

    async def meanwhile() -> None:
        if finish == "dead_letter":
            assert await jobs.dead_letter(first, RuntimeError("x"))
        elif finish == "fail_to_dead":
            assert await one_try.fail(first, RuntimeError("x"))
        else:
            await mongo.in_transaction(client, lambda s: jobs.ack(first, session=s))
            await jobs.promote_after([first])
        await jobs.publish(Job(n=2, key="a"))

    hooked.hook = meanwhile
    p1 = Queue(hooked, config=jobs.config, types=jobs.types)  # type: ignore[arg-type]

    async def publish(session: AsyncClientSession) -> None:
        await p1.publish(Job(n=1, key="a"), session=session)

    await mongo.in_transaction(client, publish)
    handed: list[int] = []
    for _ in range(10):
        claims = await jobs.claim_many(worker="w", limit=5)
        if not claims:
            break
        assert len(claims) == 1, [c.document["n"] for c in claims]
        handed.append(claims[0].document["n"])
        assert await jobs.ack(claims[0])
    assert handed == [1, 2]
