"""What every benchmark shares: a database, a command counter, a result table."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from shared_contracts.mongo import make_client
from swamp_club.embedded_db import EmbeddedDb


class CommandCounter(monitoring.CommandListener):
    """Counts the commands a client sends, by name: a cost no machine noise changes."""

    IGNORED = frozenset({"hello", "ismaster", "isMaster", "ping", "endSessions", "buildInfo"})

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.micros: collections.Counter[str] = collections.Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in self.IGNORED:
            self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.command_name not in self.IGNORED:
            self.micros[event.command_name] += event.duration_micros

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def total(self) -> int:
        return sum(self.counts.values())

    def work(self) -> int:
        """Commands that do work: all but getMore, which change streams use to wait for events."""
        return self.total() - self.counts["getMore"]

    def reset(self) -> None:
        self.counts.clear()
        self.micros.clear()

    def time_shares(self) -> dict[str, float]:
        """Share of the round-trip time spent in each command: where the work goes."""
        total = sum(self.micros.values()) or 1
        return {name: round(us / total, 3) for name, us in self.micros.most_common()}


@contextlib.contextmanager
def database_uri() -> Iterator[str]:
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
        return
    with EmbeddedDb() as db:
        yield db.uri


def counted_client(uri: str) -> tuple[AsyncMongoClient[dict[str, Any]], CommandCounter]:
    counter = CommandCounter()
    return make_client(uri, app_name="swamp-club-bench", event_listeners=[counter]), counter


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@dataclass
class Results:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, metric: str, value: float | str, unit: str = "") -> None:
        text = value if isinstance(value, str) else f"{value:,.3f}".rstrip("0").rstrip(".")
        self.rows.append((metric, f"{text} {unit}".strip()))

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {metric} | {value} |" for metric, value in self.rows]
        return "\n".join(lines) + "\n"


def machine_description(uri_is_embedded: bool) -> str:
    database = "embedded SecantusDB 0.7.0b3" if uri_is_embedded else "MONGODB_URI deployment"
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; database: {database}"
    )


def write_results(results: list[Results], path: Path = Path("bench/RESULTS.md")) -> None:
    embedded = not os.environ.get("MONGODB_URI")
    body = "\n".join(r.markdown() for r in results)
    path.write_text(
        "# Benchmark results\n\n"
        "Written by `make bench`. Absolute rates on shared machines are noise; read the ratios "
        "(measured in the same run, on the same server) and the DB commands per unit of work.\n\n"
        f"Machine: {machine_description(embedded)}\n\n{body}"
    )


async def until(
    probe: Callable[[], Awaitable[bool]], *, interval: float = 0.1, within: float = 600
) -> None:
    """Poll ``probe`` (a database query, not an in-process flag) until it holds."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {within:g}s")
        await asyncio.sleep(interval)
