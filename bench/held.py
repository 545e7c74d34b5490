"""The app's claims while one busy user's refresh is held by back-to-back watcher batches.

A watcher batch holds the pending score refreshes of its users from its start to its commit
(``Queue.hold_pending``). Here a stand-in for the watcher runs such batches for one user back to
back, each holding that user's refresh for ``--batch-seconds`` and publishing into it before it
commits, while the app claims everybody else's refreshes, a claim of ``--others`` per round. The
same rounds with nothing held are the baseline, in the same run: the ratio of claim times and
the commands per claim are what the hold costs the other users.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
import uuid
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from bench.common import CommandCounter, Results, Stopwatch, counted_client, database_uri
from shared_contracts.messages import ScoreRefresh, score_refresh_key
from shared_contracts.mongo import in_transaction, make_client
from shared_contracts.names import SWAMP_CLUB_EVENTS
from shared_contracts.queue.config import QueueConfig
from shared_contracts.queue.consumer import Consumer, Delivery, ack_all
from shared_contracts.queue.engine import Queue
from shared_contracts.queue.indexes import ensure_queue_indexes

CONFIG = QueueConfig()
CONFIG_BATCH = 100  # SCORE_REFRESH_BATCH_SIZE's default
BUSY = "busy"


def refresh(user: str, version: int) -> ScoreRefresh:
    return ScoreRefresh(
        userId=user, username=None, reason="ingest", projectionVersion=version,
        snapshot={"totalInvocations": version},
    )  # fmt: skip


class App:
    """The app's score consumer, measured: what it handled, and when."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.handled: dict[str, float] = {}
        self.busy_applied: list[float] = []
        self.changed = asyncio.Event()
        self.consumer = Consumer(
            queue, self._one, batch_handler=self._batch, batch_size=CONFIG_BATCH, worker="app"
        )

    async def _one(self, delivery: Delivery) -> None:
        await self._batch([delivery])

    async def _batch(self, deliveries: list[Delivery]) -> None:
        async def apply(session: AsyncClientSession) -> None:
            await ack_all(deliveries, session=session)

        await in_transaction(self.queue.collection.database.client, apply)
        now = time.monotonic()
        for delivery in deliveries:
            user = getattr(delivery.message, "userId", "")
            if user == BUSY:
                self.busy_applied.append(now)
            self.handled[user] = now
        self.changed.set()

    async def until_handled(self, users: set[str]) -> None:
        while not users <= self.handled.keys():
            self.changed.clear()
            await self.changed.wait()


class Rounds:
    """Per round: seconds from publishing the other users' refreshes to all applied, and the
    app's work commands meanwhile."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.commands: list[int] = []


async def rounds_of_others(
    app: App, publisher: Queue, counter: CommandCounter, *, rounds: int, others: int, tag: str
) -> Rounds:
    measured = Rounds()
    for round_ in range(rounds):
        users = {f"{tag}-{round_}-{i}" for i in range(others)}
        counter.reset()
        with Stopwatch() as clock:
            await publisher.publish_many(refresh(user, 1) for user in sorted(users))
            await app.until_handled(users)
        measured.seconds.append(clock.seconds)
        measured.commands.append(counter.work())
    return measured


async def busy_batches(
    queue: Queue, *, batch_seconds: float, gap_reads: int, stop: asyncio.Event
) -> int:
    """The watcher's batches for the busy user, back to back: ``gap_reads`` reads (the watcher
    reads its events, keys and device owners: three), then hold, work, publish, commit."""
    versions = itertools.count(2)
    batches = 0
    while not stop.is_set():
        version = next(versions)
        for _ in range(gap_reads):
            await queue.collection.find_one({"userId": BUSY}, {"_id": 1})

        async def batch(session: AsyncClientSession, version: int = version) -> None:
            await queue.hold_pending([score_refresh_key(BUSY)], session=session)
            await asyncio.sleep(batch_seconds)
            await queue.publish(refresh(BUSY, version), session=session)

        await in_transaction(queue.collection.database.client, batch)
        batches += 1
    return batches


async def run(*, rounds: int, others: int, batch_seconds: float, gap_reads: int = 3) -> Results:
    results = Results(
        f"Refreshes beside a held one (embedded, on disk): {rounds} rounds of {others} users' "
        f"refreshes through the app's consumer, one busy user's batches back to back, "
        f"{batch_seconds} s each, {gap_reads} reads between them"
    )
    with database_uri("disk") as uri:
        client, counter = counted_client(uri)  # the app's: measured
        watcher: Any = make_client(uri, app_name="bench-watcher")  # publishes, batches: not
        db = f"bench_held_{uuid.uuid4().hex[:6]}"
        try:
            await ensure_queue_indexes(client[db], done_retention_seconds=3600)
            app = App(Queue(client[db][SWAMP_CLUB_EVENTS], config=CONFIG))
            publisher = Queue(watcher[db][SWAMP_CLUB_EVENTS], config=CONFIG)
            consumer = asyncio.create_task(app.consumer.run())
            try:
                free = await rounds_of_others(
                    app, publisher, counter, rounds=rounds, others=others, tag="free"
                )
                await publisher.publish(refresh(BUSY, 1))
                stop = asyncio.Event()
                holder = asyncio.create_task(
                    busy_batches(
                        publisher, batch_seconds=batch_seconds, gap_reads=gap_reads, stop=stop
                    )
                )
                started = time.monotonic()
                held = await rounds_of_others(
                    app, publisher, counter, rounds=rounds, others=others, tag="held"
                )
                stop.set()
                batches = await holder
                ended = time.monotonic()
            finally:
                app.consumer.stop()
                await consumer
            _report(results, free, held, batches, app, started, ended)
        finally:
            await client.drop_database(db)
            await client.close()
            await watcher.close()
    return results


def _report(
    results: Results, free: Rounds, held: Rounds, batches: int, app: App, start: float, end: float
) -> None:
    free_median, held_median = statistics.median(free.seconds), statistics.median(held.seconds)
    results.add("publish -> all applied, nothing held: median / max",
                f"{free_median:.3f} / {max(free.seconds):.3f} s")  # fmt: skip
    results.add("publish -> all applied, beside the held refresh: median / max",
                f"{held_median:.3f} / {max(held.seconds):.3f} s")  # fmt: skip
    results.add("beside the held refresh / nothing held, medians", held_median / free_median, "x")
    results.add("app's work commands per round, nothing held: median",
                statistics.median(free.commands))  # fmt: skip
    results.add("app's work commands per round, beside the held refresh: median / max",
                f"{statistics.median(held.commands):g} / {max(held.commands)}")  # fmt: skip
    applied = [t for t in app.busy_applied if start <= t <= end]
    gaps = [b - a for a, b in zip([start, *applied], [*applied, end], strict=True)]
    results.add("busy user's refresh applied while its batches ran",
                f"{len(applied)} times in {end - start:.1f} s ({batches} batches); longest "
                f"wait {max(gaps):.2f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--others", type=int, default=99)
    parser.add_argument("--batch-seconds", type=float, default=0.2)
    parser.add_argument("--gap-reads", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(
        run(rounds=args.rounds, others=args.others, batch_seconds=args.batch_seconds,
            gap_reads=args.gap_reads)
    )  # fmt: skip
    print(result.finish().markdown())


if __name__ == "__main__":
    main()
