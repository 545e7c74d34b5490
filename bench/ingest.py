"""Ingest + watcher: events/s against raw insert_many, and DB commands per event by batch size.

Events go through POST /ingest (in-process ASGI, requests of 25 events as the CLI sends them),
then the watcher applies them: device buckets, identity, projection written, refresh published.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from bench.common import Results, Stopwatch, counted_client, database_uri
from shared_contracts.keys import api_key_hash as key_hash
from shared_contracts.messages import ApiKeyIssued, UserRegistered
from telemetry_service.collections import EVENTS
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.main import create_app
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings

REQUEST_SIZE = 25  # the CLI's maximum per request


def event(device: str, n: int) -> dict[str, Any]:
    event_id = str(uuid.uuid4())
    return {
        "event": "cli_invocation",
        "distinct_id": device,
        "insert_id": event_id,
        "properties": {
            "id": event_id,
            "invocation": {
                "command": ["model", "run", "init"][n % 3],
                "args": [],
                "optionKeys": [],
            },
            "result": {"status": "success" if n % 4 else "error", "exitCode": 0 if n % 4 else 1},
            "startedAt": f"2026-09-{1 + n % 28:02d}T08:01:02.003Z",
            "durationMs": 100 + n % 50,
            "platform": "linux",
        },
    }


async def run_batch_size(
    uri: str, events: int, users: int, devices: int, batch: int
) -> dict[str, float]:
    names = uuid.uuid4().hex[:6]
    settings = TelemetrySettings(
        MONGODB_URI=uri,
        TELEMETRY_DB=f"bench_t_{names}",
        BUS_DB=f"bench_b_{names}",
        TELEMETRY_RUN_WORKERS=False,
        INGEST_BATCH_SIZE=batch,
    )
    client, counter = counted_client(uri)
    app = create_app(settings)
    try:
        async with LifespanManager(app) as manager:
            runtime = TelemetryRuntime(settings=settings, client=client)
            keys = await register(runtime, users)
            payloads = [
                (
                    event(f"device-{n % devices}", n),
                    keys[(n % devices) % users] if n % devices < users else None,
                )
                for n in range(events)
            ]
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
                with Stopwatch() as ingest_clock:
                    for start in range(0, events, REQUEST_SIZE):
                        chunk = payloads[start : start + REQUEST_SIZE]
                        for key in {k for _, k in chunk}:
                            body = {"events": [e for e, k in chunk if k == key]}
                            headers = {"x-api-key": key} if key else {}
                            response = await http.post("/ingest", json=body, headers=headers)
                            assert response.status_code == 202, response.text
            counter.reset()
            with Stopwatch() as watch_clock:
                await IngestWatcher(runtime).drain()
            commands = counter.total()
            print(
                f"  batch {batch}: commands {dict(counter.counts)};",
                f"time shares {counter.time_shares()}",
            )
            raw = [d async for d in runtime.db[EVENTS].find({}, {"raw": 1})]
            scratch = client[settings.telemetry_db]["raw_copy"]
            with Stopwatch() as raw_clock:
                await scratch.insert_many([{"raw": d["raw"]} for d in raw], ordered=False)
    finally:
        await client.drop_database(settings.telemetry_db)
        await client.drop_database(settings.bus_db)
        await client.close()
    pipeline_seconds = ingest_clock.seconds + watch_clock.seconds
    return {
        "events_per_s": events / pipeline_seconds,
        "watcher_events_per_s": events / watch_clock.seconds,
        "raw_per_s": events / raw_clock.seconds,
        "commands_per_event": commands / events,
        "commands_per_batch": commands / max(1, -(-events // batch)),
    }


async def register(runtime: TelemetryRuntime, users: int) -> list[str]:
    keys = []
    for i in range(users):
        key = f"swamp_bench_{i}_{uuid.uuid4().hex}"
        await runtime.commands.publish(UserRegistered(userId=f"bench{i}", username=f"bench-{i}"))
        await runtime.commands.publish(ApiKeyIssued(userId=f"bench{i}", keyHash=key_hash(key)))
        keys.append(key)
    await command_consumer(runtime).drain()
    return keys


async def run(events: int, users: int, devices: int, batch_sizes: list[int]) -> Results:
    results = Results(
        f"Ingest + watcher: {events} events, {devices} devices, {users} users (the rest anonymous)"
    )
    with database_uri() as uri:
        for batch in batch_sizes:
            m = await run_batch_size(uri, events, users, devices, batch)
            results.add(f"batch {batch}: ingest + watcher", m["events_per_s"], "events/s")
            results.add(f"batch {batch}: watcher alone", m["watcher_events_per_s"], "events/s")
            results.add(
                f"batch {batch}: pipeline / raw insert_many",
                m["events_per_s"] / m["raw_per_s"],
                "x",
            )
            results.add(f"batch {batch}: watcher DB commands per event", m["commands_per_event"])
            results.add(f"batch {batch}: watcher DB commands per batch", m["commands_per_batch"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 100, 500])
    args = parser.parse_args()
    print(asyncio.run(run(args.events, args.users, args.devices, args.batch_sizes)).markdown())


if __name__ == "__main__":
    main()
