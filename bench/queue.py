"""Queue throughput: publish + claim + ack with 1 and 4 consumers, against raw insert_many.

Also the coalescing ratio: a burst of score refreshes for one user against the deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

from pymongo import AsyncMongoClient

from bench.common import (
    CommandCounter,
    Results,
    Stopwatch,
    counted_client,
    database_uri,
    until,
)
from shared_contracts.messages import ApiKeyRevoked, Message, ScoreRefresh, UserRegistered
from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from shared_contracts.queue.config import QueueConfig
from shared_contracts.queue.consumer import Consumer, Delivery
from shared_contracts.queue.documents import new_document
from shared_contracts.queue.engine import Queue, utcnow
from shared_contracts.queue.indexes import ensure_queue_indexes

CONFIG = QueueConfig(poll_interval_seconds=0.05, concurrency=4)
Client = AsyncMongoClient[dict[str, Any]]


def messages(n: int, *, ordered: bool = False) -> list[Message]:
    """api_key_revoked has no ordering key (the plain path); user_registered has one per user."""
    if ordered:
        return [UserRegistered(userId=f"u{i}", username=f"user-{i}") for i in range(n)]
    return [ApiKeyRevoked(keyHash=f"{i:064x}") for i in range(n)]


async def raw_insert_rate(client: Client, db: str, n: int) -> float:
    documents = [new_document(m, now=utcnow(), max_attempts=8) for m in messages(n)]
    with Stopwatch() as clock:
        await client[db]["raw"].insert_many(documents, ordered=False)
    return n / clock.seconds


async def pipeline_rate(
    client: Client,
    observer: Client,
    counter: CommandCounter,
    db: str,
    n: int,
    consumers: int,
    *,
    ordered: bool = False,
) -> tuple[float, float, float]:
    bus = client[db]
    await ensure_queue_indexes(bus, done_retention_seconds=3600)
    queue = Queue(bus[TELEMETRY_COMMANDS], config=CONFIG)

    async def handle(delivery: Delivery) -> None:
        return None

    workers = [Consumer(queue, handle, worker=f"bench-{i}") for i in range(consumers)]
    counter.reset()
    with Stopwatch() as clock:
        tasks = [asyncio.create_task(w.run()) for w in workers]
        for message in messages(n, ordered=ordered):
            await queue.publish(message)
        done = observer[db][TELEMETRY_COMMANDS]
        await until(lambda: _all_done(done, n), interval=0.2)
        for worker in workers:
            worker.stop()
        await asyncio.gather(*tasks)
    by_name = {name: round(count / n, 2) for name, count in counter.counts.most_common()}
    print(f"  {consumers} consumer(s), ordered={ordered}, commands per message:", by_name)
    return n / clock.seconds, counter.work() / n, counter.total() / n


async def _all_done(collection: Any, n: int) -> bool:
    return bool(await collection.count_documents({"status": "done"}) == n)


async def coalescing(client: Client, observer: Client, db: str, burst: int) -> tuple[int, int]:
    bus = client[db]
    await ensure_queue_indexes(bus, done_retention_seconds=3600)
    queue = Queue(bus[SWAMP_CLUB_EVENTS], config=CONFIG)
    deliveries = []

    async def slow_apply(delivery: Delivery) -> None:
        deliveries.append(delivery.message)
        await asyncio.sleep(0.05)  # an app-side score write takes time; refreshes pile up

    consumer = Consumer(queue, slow_apply)
    task = asyncio.create_task(consumer.run())
    for version in range(1, burst + 1):
        snapshot = {"totalInvocations": version}
        await queue.publish(
            ScoreRefresh(
                userId="burst-user",
                username="burst",
                reason="ingest",
                projectionVersion=version,
                snapshot=snapshot,
            )
        )
    events = observer[db][SWAMP_CLUB_EVENTS]
    await until(lambda: _no_unfinished(events), interval=0.2)
    consumer.stop()
    await task
    last = deliveries[-1]
    assert isinstance(last, ScoreRefresh)
    assert last.projectionVersion == burst
    return burst, len(deliveries)


async def _no_unfinished(collection: Any) -> bool:
    return bool(await collection.count_documents({"status": {"$in": ["pending", "active"]}}) == 0)


async def run(n: int, burst: int) -> Results:
    results = Results(f"Queue: {n} messages, publish + claim + ack")
    with database_uri() as uri:
        client, counter = counted_client(uri)
        observer, _ = counted_client(uri)
        prefix = f"bench_{uuid.uuid4().hex[:6]}"
        try:
            raw = await raw_insert_rate(client, f"{prefix}_raw", n)
            results.add("raw insert_many", raw, "docs/s")
            for consumers in (1, 4):
                rate, work, total = await pipeline_rate(
                    client, observer, counter, f"{prefix}_{consumers}", n, consumers
                )
                results.add(f"{consumers} consumer(s)", rate, "msgs/s")
                results.add(f"{consumers} consumer(s) / raw insert_many", rate / raw, "x")
                results.add(f"{consumers} consumer(s) work commands per message", work)
                results.add(
                    f"{consumers} consumer(s) all commands (with getMore) per message", total
                )
            rate, work, total = await pipeline_rate(
                client, observer, counter, f"{prefix}_ordered", n, 1, ordered=True
            )
            results.add("ordered (1 consumer, an ordering key per message)", rate, "msgs/s")
            results.add("ordered work commands per message", work)
            published, delivered = await coalescing(client, observer, f"{prefix}_burst", burst)
            results.add(f"burst of {published} refreshes for one user: deliveries", delivered)
            results.add("publishes per delivered refresh", published / delivered, "x")
        finally:
            for name in await client.list_database_names():
                if name.startswith(prefix):
                    await client.drop_database(name)
            await client.close()
            await observer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--burst", type=int, default=1000)
    args = parser.parse_args()
    print(asyncio.run(run(args.messages, args.burst)).markdown())


if __name__ == "__main__":
    main()
