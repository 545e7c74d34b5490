"""Backfill: usernames/s and DB commands per username by batch size, against a raw
scan-and-bulk-write of the same documents on the same server in the same run."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from pymongo import ReplaceOne

from bench.common import Results, Stopwatch, counted_client, database_uri
from shared_contracts.queue.indexes import ensure_queue_indexes
from telemetry_service.backfill import Backfill
from telemetry_service.collections import IDENTITY_MAP, USER_METRICS, ensure_indexes
from telemetry_service.projection.fold import fold
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings

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


async def seed(db: Any, usernames: int) -> None:
    for start in range(0, usernames, 2000):
        entries, devices = [], []
        for i in range(start, min(start + 2000, usernames)):
            uid, ids = f"u{i}", [f"d{i}-{k}" for k in range(DEVICES_PER_USER)]
            entries.append({"_id": uid, "username": f"user-{i:07d}", "distinctIds": ids})
            devices += [
                {"_id": d, "ownerUserId": uid, "anon": bucket(k + 1), "users": {uid: bucket(2)}}
                for k, d in enumerate(ids)
            ]
        await db[IDENTITY_MAP].insert_many(entries, ordered=False)
        await db[USER_METRICS].insert_many(devices, ordered=False)


async def raw_scan_and_write(db: Any, batch: int) -> None:
    """The floor: the same reads and one bulk write per batch, no transaction, no publish."""
    after = None
    while True:
        query = {"_id": {"$gt": after}} if after else {}
        entries = await db[IDENTITY_MAP].find(query, sort=[("_id", 1)], limit=batch).to_list()
        if not entries:
            return
        ids = [d for e in entries for d in e["distinctIds"]]
        devices = {d["_id"]: d async for d in db[USER_METRICS].find({"_id": {"$in": ids}})}
        writes = [
            ReplaceOne(
                {"_id": e["_id"]},
                fold(e["_id"], [devices[d] for d in e["distinctIds"]], e["distinctIds"]),
                upsert=True,
            )
            for e in entries
        ]
        await db["raw_projection"].bulk_write(writes, ordered=False)
        after = entries[-1]["_id"]


async def run(usernames: int, batch_sizes: list[int]) -> Results:
    results = Results(f"Backfill: {usernames} usernames, {DEVICES_PER_USER} devices each")
    with database_uri() as uri:
        client, counter = counted_client(uri)
        name = uuid.uuid4().hex[:6]
        settings = TelemetrySettings(
            MONGODB_URI=uri, TELEMETRY_DB=f"bench_bt_{name}", BUS_DB=f"bench_bb_{name}"
        )
        runtime = TelemetryRuntime(settings=settings, client=client)
        try:
            await ensure_indexes(runtime.db)
            await ensure_queue_indexes(runtime.bus, done_retention_seconds=3600)
            await seed(runtime.db, usernames)
            for batch in batch_sizes:
                tuned = TelemetryRuntime(
                    settings=settings.model_copy(update={"backfill_batch_size": batch}),
                    client=client,
                )
                job = Backfill(tuned)
                await job.reset()
                counter.reset()
                with Stopwatch() as backfill_clock:
                    assert await job.run_if_needed()
                commands = counter.total()
                with Stopwatch() as raw_clock:
                    await raw_scan_and_write(runtime.db, batch)
                rate = usernames / backfill_clock.seconds
                results.add(f"batch {batch}: backfill", rate, "usernames/s")
                results.add(f"batch {batch}: DB commands per username", commands / usernames)
                results.add(
                    f"batch {batch}: backfill / raw scan-and-bulk-write",
                    rate / (usernames / raw_clock.seconds),
                    "x",
                )
        finally:
            await client.drop_database(settings.telemetry_db)
            await client.drop_database(settings.bus_db)
            await client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--usernames", type=int, default=5000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[50, 500, 5000])
    args = parser.parse_args()
    print(asyncio.run(run(args.usernames, args.batch_sizes)).markdown())


if __name__ == "__main__":
    main()
