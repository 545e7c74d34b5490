"""Bounded load on loopback: 50 concurrent clients against /ingest with the workers running,
then conservation: every accepted event is in exactly one place, and nothing is dead.

A short run is part of `make test`; SWAMP_SOAK_SECONDS=60 runs the long one.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import httpx

from shared_contracts.keys import api_key_hash
from shared_contracts.messages import ApiKeyIssued, UserRegistered
from telemetry_service.main import create_app
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings
from tests.support import eventually, unapplied_events, uvicorn_client
from tests.telemetry.conftest import cli_event

CLIENTS = 50
SECONDS = float(os.environ.get("SWAMP_SOAK_SECONDS", "4"))
USERS, DEVICES = 5, 30


async def client_loop(
    http: httpx.AsyncClient,
    keys: list[str],
    deadline: float,
    rng: random.Random,
    latencies: list[float],
) -> int:
    """One CLI-like client: batches of 1-25 events, sometimes re-sending a previous batch."""
    accepted = 0
    sent: list[tuple[dict[str, Any], dict[str, str]]] = []
    while time.monotonic() < deadline:
        if sent and rng.random() < 0.1:
            body, headers = rng.choice(sent)  # a re-send with the same ids: never counted twice
        else:
            device = f"soak-dev-{rng.randrange(DEVICES)}"
            body = {"events": [cli_event(device) for _ in range(rng.randint(1, 25))]}
            key = rng.choice(keys) if rng.random() < 0.6 else None
            headers = {"x-api-key": key} if key else {}
            sent.append((body, headers))
        started = time.monotonic()
        response = await http.post("/ingest", json=body, headers=headers)
        latencies.append(time.monotonic() - started)
        assert response.status_code == 202, response.text
        accepted += response.json()["accepted"]
    return accepted


async def test_load_then_conservation(telemetry_settings: TelemetrySettings) -> None:
    settings = telemetry_settings.model_copy(
        update={"ingest_poll_interval_seconds": 0.2, "queue_poll_interval_seconds": 0.2}
    )
    app = create_app(settings)
    async with uvicorn_client(app) as http:
        runtime: TelemetryRuntime = app.state.runtime
        keys = [f"swamp_soak_{i}" for i in range(USERS)]
        for i, key in enumerate(keys):
            await runtime.commands.publish(UserRegistered(userId=f"soak{i}", username=f"soak-{i}"))
            await runtime.commands.publish(
                ApiKeyIssued(userId=f"soak{i}", keyHash=api_key_hash(key))
            )

        async def keys_known() -> bool:
            return await runtime.db.known_keys.count_documents({}) == USERS

        await eventually(keys_known, within=30)
        deadline = time.monotonic() + SECONDS
        latencies: list[float] = []
        clients = [
            client_loop(http, keys, deadline, random.Random(seed), latencies)
            for seed in range(CLIENTS)
        ]
        accepted = sum(await asyncio.gather(*clients))
        assert accepted > 0
        # Shown with -s. Reported, never asserted: the client's 30 s timeout is the only bound.
        latencies.sort()
        print(
            f"{CLIENTS} clients, {SECONDS:g}s: {accepted} events accepted in {len(latencies)}"
            f" requests; latency p50 {latencies[len(latencies) // 2]:.2f}s,"
            f" p99 {latencies[len(latencies) * 99 // 100]:.2f}s, max {latencies[-1]:.2f}s"
        )

        async def drained() -> bool:
            return await unapplied_events(runtime.db) == 0

        # The backlog drains at the watcher's pace (hundreds of events/s on the embedded server).
        await eventually(drained, within=120 + accepted / 50, interval=0.5)
        projected = sum([p["totalInvocations"] async for p in runtime.db.username_metrics.find()])
        unowned = sum(
            [
                d.get("anon", {}).get("invocations", 0)
                async for d in runtime.db.user_metrics.find({"ownerUserId": None})
            ]
        )
        assert projected + unowned == accepted
        assert await runtime.db.events.count_documents({}) == accepted
        assert await runtime.db.events.count_documents({"dead": True}) == 0
        for queue in (runtime.commands.collection, runtime.refreshes.collection):
            assert await queue.count_documents({"status": "dead"}) == 0
