"""The watcher alone: events/s against raw insert_many of the same stored events, and DB work
commands per event and per batch, by the largest batch the main line may take
(INGEST_MAX_BATCH_SIZE: a batch is the backlog up to it).

The CLI-shaped traffic of bench/traffic.py is stored through POST /ingest (in-process ASGI, no
workers running), then one watcher drains it, timed and counted alone: device buckets, identity,
projection written, refresh published (nobody consumes it). No change stream is open.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from bench.common import (
    Baseline,
    Results,
    Stopwatch,
    Storage,
    counted_client,
    database_uri,
    raw_baseline,
    spread,
    storage_label,
    telemetry_settings,
)
from bench.traffic import Population, Request, send
from shared_contracts.keys import api_key_hash as key_hash
from shared_contracts.messages import ApiKeyIssued, UserRegistered
from telemetry_service.collections import EVENTS, MAIN_LINE, PROGRESS
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.main import create_app
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime


async def run_batch_size(
    uri: str, events: int, users: int, devices_per_user: int, batch: int
) -> dict[str, Any]:
    settings = telemetry_settings(
        uri, TELEMETRY_RUN_WORKERS=False, INGEST_BATCH_SIZE=min(batch, 500),
        INGEST_MAX_BATCH_SIZE=batch,
    )  # fmt: skip
    names = settings.telemetry_db[-6:]
    client, counter = counted_client(uri)
    app = create_app(settings)
    try:
        async with LifespanManager(app) as manager:
            runtime = TelemetryRuntime(settings=settings, client=client)
            watcher = IngestWatcher(runtime)
            population = Population.build(await register(runtime, users), devices_per_user, names)
            requests = population.requests(events)
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:

                async def post(request: Request) -> None:
                    response = await http.post(
                        "/ingest", json=request.body, headers=request.headers
                    )
                    assert response.status_code == 202, response.text

                await send(post, population.warm_up(), rate=None)
                await watcher.drain()  # device ownership settled, as in the pipeline bench
                await send(post, requests, rate=None)
            batches_before = await committed_batches(runtime)
            counter.reset()
            with Stopwatch() as watch_clock:
                await watcher.drain()
            work = counter.work()  # before the baseline below adds its own inserts
            batches = await committed_batches(runtime) - batches_before
            print(
                f"  batches up to {batch}: commands {dict(counter.counts)};",
                f"time shares {counter.time_shares()}",
            )
            measured = sorted(e["insert_id"] for r in requests for e in r.events)
            stored = await runtime.db[EVENTS].find({"_id": {"$in": measured}}).to_list()
            baseline = await raw_baseline(client, settings.telemetry_db, stored)
    finally:
        await client.drop_database(settings.telemetry_db)
        await client.drop_database(settings.bus_db)
        await client.close()
    return {
        "watcher_events_per_s": events / watch_clock.seconds,
        "baseline": baseline,
        "work": work / events,
        "batches": batches,
        "mix": population.mix(requests),
    }


async def committed_batches(runtime: TelemetryRuntime) -> int:
    progress = await runtime.db[PROGRESS].find_one({"_id": MAIN_LINE})
    return int((progress or {}).get("batches", 0))


async def register(runtime: TelemetryRuntime, users: int) -> dict[str, str]:
    keys = {}
    for i in range(users):
        key = f"swamp_bench_{i}_{uuid.uuid4().hex}"
        await runtime.commands.publish(UserRegistered(userId=f"bench{i}", username=f"bench-{i}"))
        await runtime.commands.publish(ApiKeyIssued(userId=f"bench{i}", keyHash=key_hash(key)))
        keys[f"bench{i}"] = key
    await command_consumer(runtime).drain()
    return keys


async def run(
    storage: Storage, events: int, users: int, devices_per_user: int, batch_sizes: list[int]
) -> Results:
    results = Results(
        f"Watcher alone ({storage_label(storage)}): {events} stored events applied by one "
        "watcher, no HTTP, no app"
    )
    with database_uri(storage) as uri:
        runs = [
            (batch, await run_batch_size(uri, events, users, devices_per_user, batch))
            for batch in batch_sizes
        ]
    # Every run's ratio against all the run's baseline repetitions, not only its own.
    baseline = Baseline.pooled([m["baseline"] for _, m in runs])
    results.add(
        f"raw insert_many of the same {events} stored events, one call "
        f"({len(baseline.one_call)} repetitions: "
        f"{len(baseline.one_call) // len(runs)} after each of the {len(runs)} watcher runs)",
        spread(baseline.one_call), "docs/s",
    )  # fmt: skip
    results.add(f"raw insert_many of the same {events} stored events, calls of 25",
                spread(baseline.calls_of_25), "docs/s")  # fmt: skip
    for batch, m in runs:
        rate = m["watcher_events_per_s"]
        label = f"batches up to {batch}"
        results.add(f"{label}: traffic", m["mix"])
        results.add(f"{label}: watcher alone", rate, "events/s")
        results.add(f"{label}: watcher / raw insert_many, one call", rate / baseline.rate, "x")
        results.add(f"{label}: watcher / raw insert_many, calls of 25",
                    rate / baseline.rate_25, "x")  # fmt: skip
        results.add(f"{label}: watcher work commands per event", m["work"])
        results.add(f"{label}: watcher work commands per batch", m["work"] * events / m["batches"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", choices=["disk", "memory"], default="disk")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--devices-per-user", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[500, 5000])
    args = parser.parse_args()
    result = asyncio.run(
        run(args.storage, args.events, args.users, args.devices_per_user, args.batch_sizes)
    )
    print(result.markdown())


if __name__ == "__main__":
    main()
