"""Helpers shared by the tests: unique database names, in-process and real HTTP servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pymongo import monitoring

from shared_contracts import mongo
from swamp_club.embedded_db import free_port
from swamp_club.servers import make_server, running
from telemetry_service.collections import UNCLAIMED
from telemetry_service.processing.aside import OLDER_RELEASE_ASIDE_INDEXES, adopt_older_release
from telemetry_service.processing.progress import (
    UNAPPLIED_ASIDE,
    count_unapplied,
    unapplied_query,
)


class SeenCommands(monitoring.CommandListener):
    """The commands a client sent, in order: (name, the collection addressed or None). The
    client closing (endSessions) is not work and is left out."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name == "endSessions":
            return
        target = event.command.get("collection" if name == "getMore" else name)
        self.seen.append((name, target if isinstance(target, str) else None))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def names(self, collection: str | None = None) -> list[str]:
        """Command names, all of them or those addressing ``collection``."""
        return [n for n, target in self.seen if collection is None or target == collection]

    def count(self, name: str, collection: str | None = None) -> int:
        return self.names(collection).count(name)


class SeenFilters(SeenCommands):
    """The filter of every read or write a client sent: (collection, filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.filters: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command, name = event.command, event.command_name
        target = command.get(name)
        if not isinstance(target, str):
            return
        found = [command.get("filter"), command.get("query")]
        found += [statement.get("q") for statement in command.get("updates", [])]
        self.filters += [(target, f) for f in found if isinstance(f, dict)]


def find_stage(plan: Any, stage: str) -> list[dict[str, Any]]:
    """Every stage of that name in an explained plan."""
    found = []
    if isinstance(plan, dict):
        if plan.get("stage") == stage:
            found.append(plan)
        for value in plan.values():
            found += find_stage(value, stage)
    elif isinstance(plan, list):
        for value in plan:
            found += find_stage(value, stage)
    return found


async def assert_planned_on_an_index(db: Any, collection: str, query: dict[str, Any]) -> None:
    """The server plans this filter on an index, scanning no collection."""
    explained = await db.command({"explain": {"find": collection, "filter": query}})
    winning = explained["queryPlanner"]["winningPlan"]
    assert find_stage(winning, "IXSCAN"), (collection, query, winning)
    assert not find_stage(winning, "COLLSCAN"), (collection, query, winning)


class LoggedProcess(subprocess.Popen[str]):
    """A child process (`swamp-club up`) whose output goes to a file.

    Never a pipe: a pipe nobody reads fills at 64 KiB and then blocks the child in the middle of
    its work, possibly inside a transaction (it froze the crash matrix once)."""

    def __init__(
        self, command: list[str], *, env: dict[str, str], log: Path, new_session: bool = False
    ) -> None:
        """``new_session``: its own process group, so a test can signal the whole group the way
        a terminal's Ctrl-C does without signalling pytest."""
        self.log = log
        with log.open("a") as output:
            super().__init__(
                command,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=new_session,
            )

    def output(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def interrupt(self, *, grace: float = 60) -> None:
        """SIGINT (graceful, like Ctrl-C); SIGKILL if still running after ``grace`` seconds."""
        self.send_signal(signal.SIGINT)
        try:
            self.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()

    def stop(self, *, grace: float = 60) -> str:
        """Interrupt, and the output; fails unless the process exits cleanly."""
        self.interrupt(grace=grace)
        assert self.returncode == 0, self.output()
        return self.output(tail=10**9)


@dataclass(frozen=True, slots=True)
class DbNames:
    """One test's private set of the three databases (tests may run in any order)."""

    telemetry: str
    app: str
    bus: str

    @classmethod
    def unique(cls) -> DbNames:
        suffix = uuid.uuid4().hex[:10]
        return cls(telemetry=f"t_{suffix}", app=f"a_{suffix}", bus=f"b_{suffix}")

    def all(self) -> tuple[str, str, str]:
        return (self.telemetry, self.app, self.bus)


@contextlib.asynccontextmanager
async def asgi_client(
    app: FastAPI, base_url: str = "http://test"
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process: lifespan started, requests through httpx's ASGITransport."""
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client


@contextlib.asynccontextmanager
async def uvicorn_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app behind a real uvicorn server on a free loopback port."""
    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port)
    base_url = f"http://127.0.0.1:{port}"
    async with running(server), httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, within: float = 20.0, interval: float = 0.05
) -> None:
    """Wait until ``probe`` is true; a condition, not a timing assertion."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


async def swamp_club_cli(
    mongo_uri: str, names: DbNames, *args: str, with_stderr: bool = True
) -> tuple[int, str]:
    """The ``swamp-club`` command line as an operator runs it, on these test databases:
    (exit code, output)."""
    env = {
        **os.environ,
        "MONGODB_URI": mongo_uri,
        "TELEMETRY_DB": names.telemetry,
        "APP_DB": names.app,
        "BUS_DB": names.bus,
    }
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "swamp-club"), *args, env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if with_stderr else asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, output.decode()


#: True when the tests run on the embedded server rather than a MONGODB_URI deployment.
EMBEDDED = not os.environ.get("MONGODB_URI")


async def unapplied_events(db: Any) -> int:
    """Events the watcher has not applied yet, wherever they wait (above its mark or aside)."""
    return await count_unapplied(db)


async def applied_events(db: Any) -> int:
    return int(await db["events"].count_documents({})) - await unapplied_events(db)


async def applied_event_ids(db: Any) -> set[str]:
    progress = await db["ingest_progress"].find_one({"_id": "arrival"})
    applied = {"$nor": [unapplied_query(progress)]}
    ids = {d["_id"] async for d in db["events"].find(applied, {"_id": 1})}
    return ids - {d["_id"] async for d in db["events_aside"].find(UNAPPLIED_ASIDE, {"_id": 1})}


async def stuck_events(db: Any) -> list[dict[str, Any]]:
    """Unapplied events not set aside as dead: after a drain, those a watcher left behind."""
    progress = await db["ingest_progress"].find_one({"_id": "arrival"})
    on_main_line = [d async for d in db["events"].find(unapplied_query(progress))]
    aside = {**UNAPPLIED_ASIDE, "dead": {"$ne": True}}
    return on_main_line + [d async for d in db["events_aside"].find(aside)]


async def kept_aside_by_an_older_release(db: Any, documents: list[dict[str, Any]]) -> None:
    """Events an older release stored and kept aside in ``events`` (``processed: false``, under
    its ``aside`` index), then a worker of this release starts and adopts them."""
    await db["events"].create_indexes(list(OLDER_RELEASE_ASIDE_INDEXES))
    await db["events"].insert_many(documents)
    await adopt_older_release(db, look=True)  # look: this test's fixture has started before


async def put_aside(db: Any, query: dict[str, Any], **state: Any) -> None:
    """Stored events matching ``query`` aside, unclaimed, with ``state`` (attempts, ...): as an
    older release kept them, adopted as this release's start adopts them."""
    state = {"processed": False, "leaseUntil": UNCLAIMED, **state}
    await mongo.update_many(db["events"], query, {"$set": state})
    await adopt_older_release(db, look=True)


async def expire_watcher_leases(db: Any) -> None:
    """As if every watcher's lease ran out: the main line's and those of events aside (not the
    backoff of events set aside as dead)."""
    await mongo.update_many(
        db["events_aside"],
        {"processed": False, "dead": {"$ne": True}},
        {"$set": {"leaseUntil": UNCLAIMED}},
    )
    await mongo.update_many(db["ingest_progress"], {}, {"$set": {"leaseUntil": UNCLAIMED}})
