"""End to end over real uvicorn servers: POST /ingest -> watcher -> projection -> score_refresh
-> score applied by the app.

- capacity: CLI-shaped traffic (bench/traffic.py) sent unpaced by 8 senders; the clock runs from
  the first POST to the last score application that leaves every score current;
- latency: the same traffic paced at a share of the capacity just measured;
- burst: every event for one user;
- per-event lag, commands per event (work and getMore, the services' clients only) and the raw
  insert_many baseline of the same stored documents, repeated, after the services stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from bisect import bisect_left
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bson
import httpx
from prometheus_client import REGISTRY

from bench.common import (
    Baseline,
    Client,
    CommandCounter,
    CpuShare,
    Results,
    ServerProfile,
    Storage,
    counted_services,
    database_uri,
    observer_client,
    percentile,
    raw_baseline,
    scratch_databases,
    spread,
    storage_label,
    until,
)
from bench.traffic import Population, Request, send
from shared_contracts.queue.documents import PARKED
from swamp_app.collections import USER_SCORES
from swamp_app.main import create_app as create_main_app
from swamp_app.settings import AppSettings
from swamp_club.embedded_db import free_port
from swamp_club.servers import make_server, running
from telemetry_service.collections import (
    ARRIVAL_COUNTER,
    COUNTERS,
    EVENTS,
    EVENTS_ASIDE,
    MAIN_LINE,
    PROGRESS,
)
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.processing.progress import count_unapplied
from telemetry_service.settings import TelemetrySettings

REFRESHES = "swamp_club_events"


@dataclass
class Run:
    """What one pass of traffic through the pipeline measured."""

    events: int
    mix: str
    seconds: float  # first POST -> last score application
    ingest_seconds: float  # first POST -> last 202
    work: int
    get_more: int
    by_command: dict[str, int]
    lags: list[float]
    applications: int  # scores applied during the measured traffic
    batches: int  # watcher transactions that applied measured events
    baseline: Baseline | None = None
    offered_rate: float | None = None
    notes: list[str] = field(default_factory=list)
    cpu: str = ""
    server_time: str = ""
    bytes_per_event: float | None = None  # a stored event's BSON size, on average
    conflicts: str = ""  # write conflicts met by the services' statements
    delayed: int = 0  # refreshes published to wait out a user's burst (processing/bursts.py)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass
class Pipeline:
    observer: Client
    telemetry: TelemetrySettings
    app: AppSettings
    tele: httpx.AsyncClient
    main: httpx.AsyncClient


@contextlib.asynccontextmanager
async def services(
    observer: Client, telemetry: TelemetrySettings, app: AppSettings, counter: CommandCounter
) -> AsyncIterator[Pipeline]:
    """Both services with their workers and change streams on (the defaults of ``make run``),
    their clients counted; stopped (streams closed) when the block ends."""
    tport, aport = free_port(), free_port()
    with counted_services(counter):
        tele_server = make_server(create_telemetry_app(telemetry), host="127.0.0.1", port=tport)
        app_server = make_server(create_main_app(app), host="127.0.0.1", port=aport)
        async with (
            running(tele_server),
            running(app_server),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{tport}", timeout=120) as tele,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{aport}", timeout=120) as main,
        ):
            yield Pipeline(observer, telemetry, app, tele, main)


async def register_users(p: Pipeline, users: int) -> dict[str, str]:
    keys = {}
    for i in range(users):
        response = await p.main.post("/v1/users", json={"username": f"bench-{i}"})
        assert response.status_code == 201, response.text
        keys[response.json()["id"]] = response.json()["apiKey"]
    return keys


async def post(p: Pipeline, request: Request) -> None:
    response = await p.tele.post("/ingest", json=request.body, headers=request.headers)
    assert response.status_code == 202, response.text


async def settled(p: Pipeline) -> bool:
    """Every event applied and every refresh finished: each score is at its projection.

    Cheap while the backlog is large: the observer polls during the measured run on the same
    server, and counting the unapplied events (even with limit 1) costs the embedded server the
    whole backlog; the mark below the arrival counter is two single-document reads."""
    db = p.observer[p.telemetry.telemetry_db]
    progress = await db[PROGRESS].find_one({"_id": MAIN_LINE})
    counter = await db[COUNTERS].find_one({"_id": ARRIVAL_COUNTER})
    if (progress or {}).get("through", 0) < (counter or {}).get("value", 0):
        return False
    if await count_unapplied(db):
        return False
    busy = {"status": {"$in": ["pending", "active"]}}
    return not await p.observer[p.app.bus_db][REFRESHES].count_documents(busy, limit=1)


#: How long a run may take to settle before it fails.
SETTLE_SECONDS = 600.0


async def settle(p: Pipeline, *, interval: float = 0.05) -> None:
    """Wait until ``settled``; a run that never settles fails saying what was left."""
    try:
        await until(lambda: settled(p), interval=interval, within=SETTLE_SECONDS)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; left: {await leftovers(p)}") from exc


async def leftovers(p: Pipeline) -> str:
    db = p.observer[p.telemetry.telemetry_db]
    progress = await db[PROGRESS].find_one({"_id": MAIN_LINE}) or {}
    counter = await db[COUNTERS].find_one({"_id": ARRIVAL_COUNTER}) or {}
    unapplied = await count_unapplied(db)
    refreshes = p.observer[p.app.bus_db][REFRESHES]
    states = [
        f"{d['_id']}: {d['n']}"
        async for d in refreshes.aggregate([
            {"$group": {"_id": {"status": "$status", "parked": {"$eq": ["$availableAt", PARKED]}},
                        "n": {"$sum": 1}}}
        ])
    ]  # fmt: skip
    return (
        f"mark {progress.get('through')} of {counter.get('value')} (owner {progress.get('owner')}, "
        f"lease until {progress.get('leaseUntil')}), {unapplied} events unapplied; "
        f"refreshes {', '.join(states)}"
    )


def delayed_refreshes() -> int:
    """Refreshes the watcher published to wait out a burst, so far (the services run in this
    process: their Prometheus counter)."""
    return int(REGISTRY.get_sample_value("swamp_ingest_burst_refreshes_delayed_total") or 0)


async def watcher_batches(p: Pipeline) -> int:
    """Batches the watcher's main line committed so far (its progress document counts them)."""
    progress = await p.observer[p.telemetry.telemetry_db][PROGRESS].find_one({"_id": MAIN_LINE})
    return int((progress or {}).get("batches", 0))


async def traffic(
    uri: str,
    *,
    users: int,
    devices_per_user: int,
    events: int,
    rate: float | None,
    baseline: bool,
) -> Run:
    """Warm up (users, device ownership), then send ``events`` and wait until every score is
    current. Commands are counted from the first measured POST to that moment."""
    counter = CommandCounter()
    name = uuid.uuid4().hex[:6]
    common: dict[str, Any] = {"MONGODB_URI": uri, "BUS_DB": f"bench_pb_{name}"}
    telemetry = TelemetrySettings(**common, TELEMETRY_DB=f"bench_pt_{name}")
    # Every application stays in scoreHistory, so they can be counted afterwards.
    app = AppSettings(**common, APP_DB=f"bench_pa_{name}", SCORE_HISTORY_CAP=10_000)
    observer = observer_client(uri)
    try:
        async with scratch_databases(observer, telemetry.telemetry_db, app.app_db, app.bus_db):
            async with services(observer, telemetry, app, counter) as p:
                population = Population.build(
                    await register_users(p, users), devices_per_user, name[:4]
                )
                await send(lambda r: post(p, r), population.warm_up(), rate=None)
                await settle(p)
                requests = population.requests(events)
                measured = {e["insert_id"] for r in requests for e in r.events}
                batches_before = await watcher_batches(p)
                delayed_before = delayed_refreshes()
                counter.reset()
                cpu, profile = CpuShare(uri), ServerProfile(uri)
                started = datetime.now(UTC)
                ingest_seconds = await send(lambda r: post(p, r), requests, rate=rate)
                await settle(p, interval=0.2)
                cpu_shares, server_time = cpu.shares(), profile.shares()
                work, get_more = counter.snapshot()
                by_command = dict(counter.by_target.most_common())
                conflicts = counter.conflicts_text()
                delayed = delayed_refreshes() - delayed_before
            # The services are stopped, their change streams closed: measure from the database.
            run = await measure(p, population, measured, started)
            run.batches = await watcher_batches(p) - batches_before
            if baseline:
                stored = (
                    await observer[telemetry.telemetry_db][EVENTS]
                    .find({"_id": {"$in": sorted(measured)}})
                    .to_list()
                )
                run.bytes_per_event = sum(len(bson.encode(d)) for d in stored) / len(stored)
                run.baseline = await raw_baseline(observer, telemetry.telemetry_db, stored)
    finally:
        await observer.close()
    run.ingest_seconds, run.work, run.get_more, run.by_command = (
        ingest_seconds, work, get_more, by_command
    )  # fmt: skip
    run.mix = population.mix(requests)
    run.cpu, run.server_time, run.conflicts = cpu_shares, server_time, conflicts
    run.delayed = delayed
    if rate:
        run.offered_rate = events / ingest_seconds
    return run


async def measure(
    p: Pipeline, population: Population, measured: set[str], started: datetime
) -> Run:
    """Per-event lag: from each event's receipt at telemetry to the first score application
    that counts it.

    Which application counts an event: each event adds exactly 1 to its user's
    ``totalInvocations`` (the user whose key it carries, else its device's owner: ownership was
    settled in the warm-up, and every key is known, so no event goes aside). The watcher's main
    line applies events in arrival order (``seq``) and moves its mark in the same transaction,
    so a user's projection at any version holds exactly a prefix of the user's events in
    ``seq`` order: it counts an event as soon as its ``totalInvocations`` reaches the event's
    rank among the user's events. (Warm-up events may have gone aside, waiting for a key the
    app had just issued; all of them were applied before the measured ones were sent.) The
    applications are the refresh messages finished without being
    superseded whose ``projectionVersion`` is in the user's ``scoreHistory`` (stale ones, never
    applied, are not); the message's ``doneAt`` is written in the transaction that applies the
    score. A score never goes backwards (I9), so the first application at or above the rank is
    the moment the event is in the user's score. The last application of each user must equal
    the user's event count: otherwise the attribution above is wrong and the run fails.
    """
    tdb = p.observer[p.telemetry.telemetry_db]
    adb, bus = p.observer[p.app.app_db], p.observer[p.app.bus_db]
    user_of_hash = population.user_of_key_hash()
    by_user: dict[str, list[tuple[datetime, datetime, str]]] = defaultdict(list)
    went_aside = {d["_id"] async for d in tdb[EVENTS_ASIDE].find({}, {"_id": 1})}
    if went := went_aside & set(measured):
        raise AssertionError(f"measured events {sorted(went)[:5]} went aside: attribution is wrong")
    fields = {"keyHash": 1, "distinctId": 1, "receivedAt": 1, "seq": 1}
    async for e in tdb[EVENTS].find({}, fields):
        user = user_of_hash[e["keyHash"]] if e.get("keyHash") else population.owner[e["distinctId"]]
        by_user[user].append((e["seq"], e["receivedAt"], e["_id"]))
    applied_versions = {
        s["_id"]: {h["projectionVersion"] for h in s.get("scoreHistory", [])}
        async for s in adb[USER_SCORES].find({}, {"scoreHistory.projectionVersion": 1})
    }
    applied: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    done = {"status": "done", "supersededAt": {"$exists": False}}
    async for m in bus[REFRESHES].find(done, {"userId": 1, "projectionVersion": 1, "doneAt": 1,
                                              "snapshot.totalInvocations": 1}):  # fmt: skip
        if m["projectionVersion"] in applied_versions.get(m["userId"], set()):
            applied[m["userId"]].append((m["doneAt"], int(m["snapshot"]["totalInvocations"])))
    lags: list[float] = []
    applications = 0
    for user, rows in by_user.items():
        rows.sort()
        scores = sorted(applied[user])
        applications += sum(1 for done_at, _ in scores if done_at >= started)
        if not scores or scores[-1][1] != len(rows):
            raise AssertionError(
                f"user {user}: {len(rows)} events, last score counts {scores[-1:]}"
            )
        totals = [total for _, total in scores]
        for rank, (_, received, event_id) in enumerate(rows, start=1):
            if event_id in measured:
                first = bisect_left(totals, rank)
                lags.append((scores[first][0] - received).total_seconds())
    last = max(done_at for scores in applied.values() for done_at, _ in scores)
    return Run(
        events=len(measured), mix="", seconds=(last - started).total_seconds(), ingest_seconds=0,
        work=0, get_more=0, by_command={}, lags=lags, applications=applications, batches=0,
    )  # fmt: skip


def add_run(results: Results, label: str, run: Run, baseline: Baseline | None) -> None:
    results.add(f"{label}: traffic", run.mix)
    if run.offered_rate is not None:
        results.add(f"{label}: sent at", run.offered_rate, "events/s")
    results.add(f"{label}: first POST -> every score current", run.rate, "events/s")
    results.add(f"{label}: ingest alone (first POST -> last 202)", run.events / run.ingest_seconds,
                "events/s")  # fmt: skip
    if baseline:
        results.add(f"{label}: / raw insert_many, one call", run.rate / baseline.rate, "x")
        results.add(f"{label}: / raw insert_many, calls of 25", run.rate / baseline.rate_25, "x")
        results.add(f"{label}: / raw insert_many into the events' indexes, one call",
                    run.rate / baseline.rate_indexed, "x")  # fmt: skip
    results.add(
        f"{label}: commands per event, work + getMore",
        f"{run.work / run.events:.3f} + {run.get_more / run.events:.3f}",
    )
    results.add(
        f"{label}: lag receipt -> score applied, p50 / p95 / p99 / max",
        " / ".join(f"{percentile(run.lags, q):.3f}" for q in (0.5, 0.95, 0.99, 1.0)),
        f"s over all {len(run.lags)} events",
    )
    results.add(
        f"{label}: watcher batches / score applications", f"{run.batches} / {run.applications}"
    )
    results.add(f"{label}: refresh publishes with a burst's delay (most into one already waiting)",
                run.delayed)  # fmt: skip
    results.add(f"{label}: write conflicts (each aborts its transaction, which runs again)",
                run.conflicts)  # fmt: skip
    if run.bytes_per_event is not None:
        results.add(f"{label}: stored event size (BSON, average)", run.bytes_per_event, "bytes")
    results.add(f"{label}: CPU while it ran", run.cpu)
    results.add(f"{label}: database server's time by command (sampled)", run.server_time)
    print(f"  {label}: commands {run.by_command}")


def add_baseline(results: Results, baseline: Baseline, events: int) -> None:
    results.add(f"raw insert_many of the same {events} stored events, one call",
                spread(baseline.one_call), "docs/s")  # fmt: skip
    results.add(f"raw insert_many of the same {events} stored events, calls of 25",
                spread(baseline.calls_of_25), "docs/s")  # fmt: skip
    results.add(f"raw insert_many of the same {events} stored events into a collection with "
                "the events' indexes, one call", spread(baseline.indexed), "docs/s")  # fmt: skip
    results.add(f"raw insert_many of the same {events} stored events into a collection with "
                "the four indexes events had before events_aside (df64149), one call",
                spread(baseline.older_indexes), "docs/s")  # fmt: skip


@dataclass
class Capacity:
    results: Results
    rate: float
    baseline: Baseline


async def run(
    storage: Storage,
    *,
    events: int,
    users: int,
    devices_per_user: int,
    loads: list[float],
    latency_seconds: float,
    burst: int,
) -> Results:
    results = Results(
        f"Ingest to score ({storage_label(storage)}): {users} users x {devices_per_user} devices, "
        f"8 senders, real uvicorn, change streams on"
    )
    with database_uri(storage) as uri:
        cap = await traffic(uri, users=users, devices_per_user=devices_per_user, events=events,
                            rate=None, baseline=True)  # fmt: skip
        assert cap.baseline is not None
        add_baseline(results, cap.baseline, events)
        add_run(results, "capacity (unpaced)", cap, cap.baseline)
        for load in loads:
            rate = load * cap.rate
            paced = await traffic(
                uri, users=users, devices_per_user=devices_per_user,
                events=max(200, round(rate * latency_seconds)), rate=rate, baseline=False,
            )  # fmt: skip
            add_run(results, f"{load:.0%} of capacity ({rate:.0f} events/s)", paced, None)
        if burst:
            b = await traffic(uri, users=1, devices_per_user=devices_per_user, events=burst,
                              rate=None, baseline=False)  # fmt: skip
            label = f"burst: {burst} events for one user, unpaced"
            add_run(results, label, b, None)
            results.add(f"{label}: / raw insert_many (capacity run's baseline)",
                        b.rate / cap.baseline.rate, "x")  # fmt: skip
            results.add(f"{label}: score applications", b.applications)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", choices=["disk", "memory"], default="disk")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--devices-per-user", type=int, default=10)
    parser.add_argument("--loads", type=float, nargs="*", default=[0.5, 0.8])
    parser.add_argument("--latency-seconds", type=float, default=10)
    parser.add_argument("--burst", type=int, default=0)
    args = parser.parse_args()
    results = asyncio.run(
        run(args.storage, events=args.events, users=args.users,
            devices_per_user=args.devices_per_user, loads=args.loads,
            latency_seconds=args.latency_seconds, burst=args.burst)
    )  # fmt: skip
    print(results.markdown())


if __name__ == "__main__":
    main()
