"""Replicas on one database server: 1, 2 and 4 telemetry processes (`swamp-club telemetry
serve`, each with its workers) behind the same CLI-shaped traffic, one app process.

Each count runs on fresh databases of the same server: first POST to every score current, the
senders spread over the replicas. No command counts here (they are per process; the pipeline
bench counts them in one): the rate against one replica's, and where the CPU went (the server's
process, the replicas together).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

from bench.common import (
    CpuShare,
    Results,
    ServerProfile,
    Storage,
    database_uri,
    observer_client,
    percentile,
    scratch_databases,
    storage_label,
    until,
)
from bench.pipeline import Pipeline, measure, register_users, settle
from bench.traffic import Population, Request, send
from swamp_app.settings import AppSettings
from swamp_club.embedded_db import free_port
from telemetry_service.settings import TelemetrySettings

EXECUTABLE = str(Path(sys.executable).with_name("swamp-club"))


@dataclass
class Started:
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def died(self) -> str | None:
        """Its first error and the end of its log, if it exited (the end alone is often only
        the server's own exit, not why)."""
        if self.process.poll() is None:
            return None
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        first = max(text.find('"level": "error"'), 0)
        head = text[first : first + 3000]
        args = " ".join(map(str, self.process.args))
        return f"{args} exited ({self.process.returncode}): {head}\n...\n{text[-1500:]}"


@contextlib.contextmanager
def processes(commands: list[tuple[list[str], dict[str, str]]]) -> Iterator[list[Started]]:
    """Start them (each logging to a temporary file, read back if it dies), yield them; stop
    them (SIGTERM, then SIGKILL) when the block ends."""
    with contextlib.ExitStack() as files:
        started = []
        for args, env in commands:
            log = files.enter_context(tempfile.TemporaryFile())
            process = subprocess.Popen(args, env={**os.environ, **env}, stdout=log, stderr=log)
            started.append(Started(process, log))
        try:
            yield started
        finally:
            for each in started:
                each.process.terminate()
            for each in started:
                try:
                    each.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    each.process.kill()


async def ready(urls: list[str], started: list[Started]) -> None:
    async with httpx.AsyncClient(timeout=5) as http:

        async def all_ready() -> bool:
            for each in started:
                if (died := each.died()) is not None:
                    raise RuntimeError(died)
            for url in urls:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{url}/readyz")).status_code == 200:
                        continue
                return False
            return True

        await until(all_ready, interval=0.2, within=120)


@contextlib.asynccontextmanager
async def system(
    uri: str, replicas: int, name: str
) -> AsyncIterator[tuple[Pipeline, list[httpx.AsyncClient], list[int]]]:
    common = {"MONGODB_URI": uri, "BUS_DB": f"bench_rb_{name}"}
    telemetry = TelemetrySettings(**common, TELEMETRY_DB=f"bench_rt_{name}")
    app = AppSettings(**common, APP_DB=f"bench_ra_{name}", SCORE_HISTORY_CAP=10_000)
    tports = [free_port() for _ in range(replicas)]
    aport = free_port()
    env = {**common, "TELEMETRY_DB": telemetry.telemetry_db, "APP_DB": app.app_db,
           "SCORE_HISTORY_CAP": "10000"}  # fmt: skip
    commands = [([EXECUTABLE, "app", "serve"], {**env, "APP_PORT": str(aport)})] + [
        ([EXECUTABLE, "telemetry", "serve"], {**env, "TELEMETRY_PORT": str(port)})
        for port in tports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in tports]
    observer = observer_client(uri)
    try:
        async with scratch_databases(observer, telemetry.telemetry_db, app.app_db, app.bus_db):
            with processes(commands) as started:
                pids = [each.process.pid for each in started]
                await ready([f"http://127.0.0.1:{aport}", *urls], started)
                async with contextlib.AsyncExitStack() as stack:
                    clients = [
                        await stack.enter_async_context(httpx.AsyncClient(base_url=u, timeout=120))
                        for u in urls
                    ]
                    main = await stack.enter_async_context(
                        httpx.AsyncClient(base_url=f"http://127.0.0.1:{aport}", timeout=120)
                    )
                    yield Pipeline(observer, telemetry, app, clients[0], main), clients, pids[1:]
    finally:
        await observer.close()


async def one_count(
    uri: str, replicas: int, *, users: int, devices: int, events: int
) -> dict[str, Any]:
    name = uuid.uuid4().hex[:6]
    async with system(uri, replicas, name) as (p, clients, pids):
        population = Population.build(await register_users(p, users), devices, name[:4])
        turn = itertools.cycle(clients)

        async def post(request: Request) -> None:
            # Each request goes to the next replica, as a load balancer would spread them.
            response = await next(turn).post("/ingest", json=request.body, headers=request.headers)
            assert response.status_code == 202, response.text

        await send(post, population.warm_up(), rate=None)
        await settle(p)
        requests = population.requests(events)
        measured = {e["insert_id"] for r in requests for e in r.events}
        cpu = CpuShare(uri, services=pids, label="replicas")
        profile = ServerProfile(uri)
        started = datetime.now(UTC)
        await send(post, requests, rate=None)
        await settle(p, interval=0.2)
        cpu_shares, server_time = cpu.shares(), profile.shares()
        run = await measure(p, population, measured, started)
    return {
        "rate": run.rate,
        "cpu": cpu_shares,
        "p99": percentile(run.lags, 0.99),
        "server_time": server_time,
    }


async def run(
    storage: Storage, counts: list[int], *, users: int, devices_per_user: int, events: int
) -> Results:
    results = Results(
        f"Replicas ({storage_label(storage)}): 1 app and N telemetry processes on one server, "
        f"{users} users x {devices_per_user} devices, {events} events, 8 senders spread over them"
    )
    with database_uri(storage) as uri:
        base = None
        for count in counts:
            measured = await one_count(uri, count, users=users, devices=devices_per_user,
                                       events=events)  # fmt: skip
            base = base or measured["rate"]
            label = f"{count} telemetry process{'es' if count > 1 else ''}"
            results.add(f"{label}: first POST -> every score current", measured["rate"],
                        "events/s")  # fmt: skip
            results.add(f"{label}: / one process", measured["rate"] / base, "x")
            results.add(f"{label}: lag p99", measured["p99"], "s")
            results.add(f"{label}: CPU while it ran", measured["cpu"])
            results.add(f"{label}: database server's time by command (sampled)",
                        measured["server_time"])  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", choices=["disk", "memory"], default="disk")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--devices-per-user", type=int, default=10)
    args = parser.parse_args()
    results = asyncio.run(
        run(args.storage, args.counts, users=args.users, devices_per_user=args.devices_per_user,
            events=args.events)
    )  # fmt: skip
    print(results.finish().markdown())


if __name__ == "__main__":
    main()
