"""Backfill: usernames/s and DB work commands per username as the population grows (1k, 10k,
50k users), by batch size.

The backfill walks every user; on the embedded server a 10k run would take minutes, so each run
stops after ``--cap-seconds`` and reports the usernames committed by then (read from the
backfill's marker). A flat rate means the same rate whatever the population.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    BASELINE_REPETITIONS,
    Results,
    ServerProfile,
    Stopwatch,
    Storage,
    counted_client,
    database_uri,
    observer_client,
    scratch_databases,
    spread,
    storage_label,
    telemetry_settings,
)
from shared_contracts.queue.indexes import ensure_queue_indexes
from telemetry_service.backfill import MARKER, Backfill
from telemetry_service.collections import (
    IDENTITY_MAP,
    MIGRATIONS,
    USER_METRICS,
    ensure_indexes,
)
from telemetry_service.runtime import TelemetryRuntime

DEVICES_PER_USER = 3


def bucket(n: int) -> dict[str, Any]:
    seen = datetime(2026, 3, 1 + n % 28, tzinfo=UTC)
    return {
        "invocations": n,
        "successCount": n,
        "commandCounts": {"model": n},
        "activeDays": [seen.date().isoformat()],
        "firstSeenAt": seen,
        "lastSeenAt": seen,
    }


def population(first: int, stop: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Users ``first`` to ``stop - 1``: their identity entries and their devices."""
    entries, devices = [], []
    for i in range(first, stop):
        uid, ids = f"u{i}", [f"d{i}-{k}" for k in range(DEVICES_PER_USER)]
        entries.append({"_id": uid, "username": f"user-{i:07d}", "distinctIds": ids})
        devices += [
            {"_id": d, "ownerUserId": uid, "anon": bucket(k + 1), "users": {uid: bucket(2)}}
            for k, d in enumerate(ids)
        ]
    return entries, devices


async def seed(db: Any, usernames: int) -> None:
    for start in range(0, usernames, 2000):
        entries, devices = population(start, min(start + 2000, usernames))
        await db[IDENTITY_MAP].insert_many(entries, ordered=False)
        await db[USER_METRICS].insert_many(devices, ordered=False)


#: The baseline's documents: the devices of 1,000 users, the same whatever the population.
BASELINE_DEVICES = population(0, 1000)[1]


async def device_baseline(db: Any) -> list[float]:
    """Raw insert_many of BASELINE_DEVICES in one call into a fresh collection, timed
    BASELINE_REPETITIONS times: docs/s. The same work at every population size: what moves it
    is the server's speed at the time, not the backfill's work (the server's CPU time for the
    same 50k seed was 38 s in one run and 58 s in the next here)."""
    rates = []
    for _ in range(BASELINE_REPETITIONS):
        await db["raw_copy"].drop()
        with Stopwatch() as clock:
            await db["raw_copy"].insert_many([dict(d) for d in BASELINE_DEVICES], ordered=False)
        rates.append(len(BASELINE_DEVICES) / clock.seconds)
    await db["raw_copy"].drop()
    return rates


@dataclass
class Once:
    done: int  # usernames committed
    seconds: float  # to commit them
    work: int  # work commands sent until then
    finished: bool
    server_time: str  # the server's time by command while it ran
    #: device_baseline's repetitions right before the run and right after it
    baseline: list[float]


async def backfill_once(uri: str, usernames: int, batch: int, cap_seconds: float) -> Once:
    """Seed ``usernames`` users, run the backfill until done or ``cap_seconds``. Progress is
    read from the marker (updated in each batch's transaction) by an uncounted observer."""
    client, counter = counted_client(uri)
    observer = observer_client(uri)
    settings = telemetry_settings(uri, BACKFILL_BATCH_SIZE=batch)
    runtime = TelemetryRuntime(settings=settings, client=client)
    try:
        async with scratch_databases(observer, settings.telemetry_db, settings.bus_db):
            await ensure_indexes(runtime.db)
            await ensure_queue_indexes(runtime.bus, done_retention_seconds=3600)
            await seed(observer[settings.telemetry_db], usernames)
            baseline = await device_baseline(observer[settings.telemetry_db])
            job = Backfill(runtime)
            await job.reset()
            marker = observer[settings.telemetry_db][MIGRATIONS]
            counter.reset()
            profile = ServerProfile(uri)
            started = time.monotonic()
            task = asyncio.create_task(job.run_if_needed())
            done, seconds, work = 0, 0.0, 0
            while not task.done() and time.monotonic() - started < cap_seconds:
                await asyncio.wait({task}, timeout=0.25)
                state = await marker.find_one({"_id": MARKER}) or {}
                if int(state.get("users", 0)) != done:
                    done, seconds = int(state.get("users", 0)), time.monotonic() - started
                    work = counter.work()
            finished = task.done()
            if finished:
                assert task.result()
                seconds, work = time.monotonic() - started, counter.work()
            else:
                task.cancel()  # mid-batch: its transaction is aborted with its session
                await asyncio.gather(task, return_exceptions=True)
            server_time = profile.shares()
            baseline += await device_baseline(observer[settings.telemetry_db])
    finally:
        await client.close()
        await observer.close()
    return Once(done, seconds, work, finished, server_time, baseline)


async def run(
    storage: Storage, sizes: list[int], batch_sizes: list[int], cap_seconds: float
) -> Results:
    results = Results(
        f"Backfill ({storage_label(storage)}): {DEVICES_PER_USER} devices per user, each run "
        f"stopped after {cap_seconds:g} s if not finished"
    )
    with database_uri(storage) as uri:
        for batch in batch_sizes:
            for size in sizes:
                once = await backfill_once(uri, size, batch, cap_seconds)
                label = f"{size:,} users, batch {batch}"
                scope = (
                    "all"
                    if once.finished
                    else f"first {once.done:,} in {once.seconds:.0f} s (capped)"
                )
                results.add(f"{label}: usernames done", scope)
                rate = once.done / once.seconds if once.seconds else 0
                results.add(f"{label}: rate", rate, "usernames/s")
                docs = statistics.median(once.baseline)
                results.add(f"{label}: raw insert_many of {len(BASELINE_DEVICES):,} devices, "
                            f"one call, {len(once.baseline)} repetitions around the run",
                            f"{spread(once.baseline)} docs/s")  # fmt: skip
                results.add(f"{label}: rate per 1,000 docs/s of that insert",
                            1000 * rate / docs, "usernames/s")  # fmt: skip
                results.add(f"{label}: work commands per username", once.work / max(once.done, 1))
                results.add(f"{label}: database server's time by command (sampled)",
                            once.server_time)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", choices=["disk", "memory"], default="disk")
    parser.add_argument("--usernames", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[500])
    parser.add_argument("--cap-seconds", type=float, default=40)
    args = parser.parse_args()
    result = asyncio.run(run(args.storage, args.usernames, args.batch_sizes, args.cap_seconds))
    print(result.markdown())


if __name__ == "__main__":
    main()
