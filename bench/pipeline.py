"""End to end: ingest -> watcher -> projection -> refresh -> score, over real uvicorn servers.

Reports events/s against a raw insert_many of the same events, DB commands per event, and the
lag from event receipt to score applied (p50/p95/p99), with change streams on and with polling
only. The lag of each refresh is read from the database afterwards: the refresh message's
doneAt (acked in the score's transaction) minus the snapshot's lastEventReceivedAt.
Also: the rename lag, from the app's 200 to telemetry answering under the new name.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import httpx
from pymongo import monitoring

from bench.common import CommandCounter, Results, Stopwatch, database_uri, until
from bench.ingest import event
from shared_contracts.mongo import make_client
from swamp_app.main import create_app as create_main_app
from swamp_app.settings import AppSettings
from swamp_club.embedded_db import free_port
from swamp_club.servers import make_server, running
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.settings import TelemetrySettings

COUNTER = CommandCounter()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def scenario(
    uri: str, *, events: int, rate: float, users: int, change_streams: bool, renames: int
) -> dict[str, Any]:
    name = uuid.uuid4().hex[:6]
    common = {
        "MONGODB_URI": uri,
        "BUS_DB": f"bench_pb_{name}",
        "QUEUE_CHANGE_STREAMS": change_streams,
        "QUEUE_POLL_INTERVAL_SECONDS": 1.0,
    }
    telemetry = TelemetrySettings(
        **common, TELEMETRY_DB=f"bench_pt_{name}", INGEST_POLL_INTERVAL_SECONDS=1.0,
        COMMAND_POLL_INTERVAL_SECONDS=1.0,
    )  # fmt: skip
    app = AppSettings(**common, APP_DB=f"bench_pa_{name}")
    observer = make_client(uri, app_name="bench-observer")  # created before the listener
    tport, aport = free_port(), free_port()
    result: dict[str, Any] = {}
    try:
        async with (
            running(make_server(create_telemetry_app(telemetry), host="127.0.0.1", port=tport)),
            running(make_server(create_main_app(app), host="127.0.0.1", port=aport)),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{tport}", timeout=60) as tele,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{aport}", timeout=60) as main,
        ):
            keys = [
                (await main.post("/v1/users", json={"username": f"bench-{name}-{i}"})).json()[
                    "apiKey"
                ]
                for i in range(users)
            ]
            for key in keys:
                await until(lambda k=key: _known(tele, k))
            await until(lambda: _drained(observer, telemetry, app))
            COUNTER.reset()
            payloads = [event(f"dev-{name}-{n % (users * 2)}", n) for n in range(events)]
            with Stopwatch() as clock:
                await paced_send(tele, payloads, keys, rate)
                await until(lambda: _drained(observer, telemetry, app))
            result["events_per_s"] = events / clock.seconds
            result["commands_per_event"] = COUNTER.total() / events
            result["lags"] = await refresh_lags(observer, app)
            raw = observer[telemetry.telemetry_db]["raw_copy"]
            with Stopwatch() as raw_clock:
                await raw.insert_many([{"raw": p} for p in payloads], ordered=False)
            result["raw_per_s"] = events / raw_clock.seconds
            result["rename_lags"] = await rename_lags(tele, main, keys, name, renames)
    finally:
        for db in (telemetry.telemetry_db, app.app_db, telemetry.bus_db):
            await observer.drop_database(db)
        await observer.close()
    return result


async def _known(tele: httpx.AsyncClient, key: str) -> bool:
    # A probe event per user: it is one of the events, counted like any other.
    probe = event(f"probe-{key[-6:]}", 0)
    return (await tele.post("/ingest", json=probe, headers={"x-api-key": key})).status_code == 202


async def paced_send(
    tele: httpx.AsyncClient, payloads: list[dict[str, Any]], keys: list[str], rate: float
) -> None:
    """Requests of 25 events (the CLI's maximum) at a steady overall rate."""
    started = time.monotonic()
    sent = 0
    pending = []
    for start in range(0, len(payloads), 25):
        chunk = payloads[start : start + 25]
        key = keys[(start // 25) % len(keys)] if (start // 25) % 2 == 0 else None
        headers = {"x-api-key": key} if key else {}
        pending.append(
            asyncio.create_task(tele.post("/ingest", json={"events": chunk}, headers=headers))
        )
        sent += len(chunk)
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    responses = await asyncio.gather(*pending)
    assert all(r.status_code == 202 for r in responses), [
        r.text for r in responses if r.status_code != 202
    ][:1]


async def _drained(observer: Any, telemetry: TelemetrySettings, app: AppSettings) -> bool:
    events = await observer[telemetry.telemetry_db]["events"].count_documents({"processed": False})
    busy = await observer[app.bus_db]["swamp_club_events"].count_documents(
        {"status": {"$in": ["pending", "active"]}}
    )
    return bool(events == 0 and busy == 0)


async def refresh_lags(observer: Any, app: AppSettings) -> list[float]:
    lags = []
    async for message in observer[app.bus_db]["swamp_club_events"].find(
        {
            "status": "done",
            "reason": {"$in": ["ingest", "binding"]},
            "supersededAt": {"$exists": False},
        }
    ):
        received = message["snapshot"].get("lastEventReceivedAt")
        if received is not None:
            lags.append((message["doneAt"] - received).total_seconds())
    return lags


async def rename_lags(
    tele: httpx.AsyncClient, main: httpx.AsyncClient, keys: list[str], name: str, count: int
) -> list[float]:
    lags = []
    for i in range(count):
        key = keys[i % len(keys)]
        new = f"rn-{name}-{i}"
        response = await main.patch(
            "/v1/users/me", json={"username": new}, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        started = time.monotonic()
        while (await tele.get("/v1/stats", params={"username": new})).status_code != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        lags.append(time.monotonic() - started)
    return lags


async def run(events: int, rate: float, users: int, renames: int) -> Results:
    results = Results(
        f"Ingest to score: {events} events at {rate:g}/s, {users} users, real uvicorn"
    )
    monitoring.register(COUNTER)  # every client created from here on is counted
    with database_uri() as uri:
        for change_streams in (True, False):
            label = "change streams" if change_streams else "polling only (1 s)"
            r = await scenario(
                uri, events=events, rate=rate, users=users, change_streams=change_streams,
                renames=renames if change_streams else 0,
            )  # fmt: skip
            lags = r["lags"]
            results.add(f"{label}: events/s end to end", r["events_per_s"], "events/s")
            results.add(f"{label}: / raw insert_many", r["events_per_s"] / r["raw_per_s"], "x")
            results.add(f"{label}: DB commands per event", r["commands_per_event"])
            results.add(
                f"{label}: lag event -> score p50 / p95 / p99",
                " / ".join(f"{percentile(lags, q):.3f}" for q in (0.5, 0.95, 0.99)),
                f"s ({len(lags)} refreshes)",
            )
            if change_streams and r["rename_lags"]:
                rl = r["rename_lags"]
                results.add(
                    f"rename: app 200 -> telemetry stats, p50 / p99 over {len(rl)}",
                    f"{statistics.median(rl):.3f} / {percentile(rl, 0.99):.3f}",
                    "s",
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second, steady")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--renames", type=int, default=20)
    args = parser.parse_args()
    print(asyncio.run(run(args.events, args.rate, args.users, args.renames)).markdown())


if __name__ == "__main__":
    main()
