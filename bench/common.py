"""What every benchmark shares: a database per storage mode, the services' command counter,
the run's environment (commit, versions, load), repeated baselines and a result table."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import itertools
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import pymongo
from pymongo import AsyncMongoClient, monitoring

from shared_contracts.mongo import make_client
from swamp_club.embedded_db import EmbeddedDb
from telemetry_service.collections import event_indexes
from telemetry_service.processing.aside import OLDER_RELEASE_ASIDE_INDEXES
from telemetry_service.settings import TelemetrySettings

Client = AsyncMongoClient[dict[str, Any]]
Storage = Literal["disk", "memory"]
#: Repetitions of every raw baseline; the median is reported.
BASELINE_REPETITIONS = 5
#: The CLI's maximum events per request, and the size of the baseline's small calls.
REQUEST_SIZE = 25


class CommandCounter(monitoring.CommandListener):
    """Counts the commands a client sends, by name: a cost no machine noise changes.

    Attached only to the clients under measurement (the services' own, see ``counted_services``),
    never to the bench's observer, so its polling and reads are not counted."""

    IGNORED = frozenset({"hello", "ismaster", "isMaster", "ping", "endSessions", "buildInfo"})

    #: The server's WriteConflict: the statement's transaction is aborted and run again whole.
    WRITE_CONFLICT = 112

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.micros: collections.Counter[str] = collections.Counter()
        self.by_target: collections.Counter[str] = collections.Counter()
        #: Write conflicts by the statement that met them ("update swamp_club_events").
        self.conflicts: collections.Counter[str] = collections.Counter()
        self._targets: dict[int, str] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in self.IGNORED:
            self.counts[event.command_name] += 1
            target = f"{event.command_name} {target_of(event)}"
            self.by_target[target] += 1
            if event.command_name == "update":
                target += update_kind(event.command.get("updates") or [{}])
            self._targets[event.request_id] = target

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._targets.pop(event.request_id, None)
        if event.command_name not in self.IGNORED:
            self.micros[event.command_name] += event.duration_micros

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        target = self._targets.pop(event.request_id, event.command_name)
        failure = event.failure if isinstance(event.failure, dict) else {}
        if failure.get("code") == self.WRITE_CONFLICT:
            self.conflicts[target] += 1

    def total(self) -> int:
        return sum(self.counts.values())

    def get_more(self) -> int:
        """getMore: change streams waiting for events (and cursor batches): not work done."""
        return self.counts["getMore"]

    def work(self) -> int:
        return self.total() - self.get_more()

    def reset(self) -> None:
        self.counts.clear()
        self.micros.clear()
        self.by_target.clear()
        self.conflicts.clear()

    def conflicts_text(self) -> str:
        return ", ".join(f"{n} on {t}" for t, n in self.conflicts.most_common()) or "none"

    def snapshot(self) -> tuple[int, int]:
        return self.work(), self.get_more()

    def time_shares(self) -> dict[str, float]:
        """Share of the round-trip time spent in each command: where the work goes."""
        total = sum(self.micros.values()) or 1
        return {name: round(us / total, 3) for name, us in self.micros.most_common()}


def update_kind(updates: list[dict[str, Any]]) -> str:
    """Which of the queue's writes an update is, by its shape (for the write conflicts)."""
    first = updates[0]
    if first.get("upsert"):
        return " (an upsert: a coalescing publish)"
    if "orderingKey" in first.get("q", {}):
        return " (a hold of pending messages)"
    if "availableAt" in first.get("q", {}):
        return " (a claim)"
    return ""


def target_of(event: monitoring.CommandStartedEvent) -> str:
    """The collection a command addresses (getMore names it apart), or its database."""
    name = event.command.get(event.command_name)
    if event.command_name == "getMore":
        name = event.command.get("collection")
    return name if isinstance(name, str) else event.database_name


@contextlib.contextmanager
def counted_services(counter: CommandCounter) -> Iterator[None]:
    """While open, the clients the two services create in their lifespans carry ``counter``.

    The services build their one client with ``make_client`` in ``main.py``; wrapping that name
    there (no production change) attaches the listener to those clients only. A global
    ``monitoring.register`` would also count the bench's observer and any client created later.
    """

    def with_counter(uri: str, *, app_name: str, **kwargs: Any) -> Client:
        listeners = [*kwargs.pop("event_listeners", []), counter]
        return make_client(uri, app_name=app_name, event_listeners=listeners, **kwargs)

    with (
        mock.patch("telemetry_service.main.make_client", with_counter),
        mock.patch("swamp_app.main.make_client", with_counter),
    ):
        yield


def counted_client(uri: str) -> tuple[Client, CommandCounter]:
    counter = CommandCounter()
    return make_client(uri, app_name="swamp-club-bench", event_listeners=[counter]), counter


def observer_client(uri: str) -> Client:
    """The bench's own reads and waits: never counted."""
    return make_client(uri, app_name="bench-observer")


#: Embedded servers started by database_uri: uri -> process id, to read their CPU time.
SERVER_PIDS: dict[str, int] = {}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of a process so far: this one (every thread) by default."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_counters() -> tuple[float, float, float, float] | None:
    """Seconds some task waited for a CPU and for IO (Linux pressure stall information), and
    this machine's stolen and total CPU ticks so far; None where /proc does not have them."""
    try:
        stalled = [
            int(Path(f"/proc/pressure/{kind}").read_text().split()[4].split("=")[1]) / 1e6
            for kind in ("cpu", "io")
        ]
        ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None
    return stalled[0], stalled[1], float(ticks[7]), float(sum(ticks[:8]))


def machine_pressure(before: tuple[float, float, float, float] | None, wall: float) -> str:
    """What else held the run back: the share of its wall time in which some task on the
    machine waited for a CPU, or for IO, and the share of the machine's CPU time the host
    stole (a shared VM). A run that stalls with its own processes idle shows here."""
    after = machine_counters()
    if before is None or after is None or wall <= 0:
        return "machine pressure not available"
    cpu, io = ((after[i] - before[i]) / wall for i in (0, 1))
    steal = (after[2] - before[2]) / max(after[3] - before[3], 1)
    waits = f"some task waiting for a CPU {cpu:.2f}, for IO {io:.2f} of the time"
    return f"machine: {waits}; steal {steal:.2f}"


class CpuShare:
    """Where a run's CPU went: the database server's process and the services' (this process
    by default: services and senders; or the service processes given), each as a share of one
    core over the run's wall time. On the embedded server (one Python process) a server share
    near 1.0 means the server bounds the run."""

    def __init__(
        self, uri: str, *, services: list[int] | None = None, label: str = "services + senders"
    ) -> None:
        self.pid = SERVER_PIDS.get(uri)
        self.services, self.label = services, label
        self.started = (time.perf_counter(), self._server(), self._services())
        self.machine = machine_counters()

    def _server(self) -> float:
        return cpu_seconds(self.pid) if self.pid else 0.0

    def _services(self) -> float:
        if self.services is None:
            return cpu_seconds()
        return sum(cpu_seconds(pid) for pid in self.services)

    def shares(self) -> str:
        wall = time.perf_counter() - self.started[0]
        server = (self._server() - self.started[1]) / wall
        services = (self._services() - self.started[2]) / wall
        where = f"{server:.2f} database server" if self.pid else "database server not local"
        pressure = machine_pressure(self.machine, wall)
        return f"{where}, {services:.2f} {self.label} (share of one core); {pressure}"


class ServerProfile:
    """Where the embedded server's time went while a run was measured: py-spy samples of its
    process, each charged to the command handler it was in (``_find_and_modify``, ``_insert``,
    ``_commit_transaction``...). With the server's CPU share near one core, this is the profile
    of what bounds the pipeline. Nothing on a server that is not local or where py-spy cannot
    attach (it needs ptrace)."""

    RATE = 100  # samples per second

    def __init__(self, uri: str) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.note = "server not local"
        pid = SERVER_PIDS.get(uri)
        spy = Path(sys.executable).with_name("py-spy")
        if pid is None:
            return
        if not spy.exists():
            self.note = "py-spy not installed"
            return
        self.output = Path(tempfile.mkdtemp(prefix="swamp-profile-")) / "server.txt"
        self.process = subprocess.Popen(
            [str(spy), "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
             "--rate", str(self.RATE), "--output", str(self.output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def shares(self) -> str:
        """The top handlers by share of the samples, e.g. '_find_and_modify 0.41, _insert ...',
        then the share of all samples spent reading index definitions for writes."""
        if self.process is None:
            return self.note
        self.process.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
        _, error = self.process.communicate(timeout=60)
        if not self.output.exists():
            return f"unavailable ({error.decode(errors='replace').strip()[-120:]})"
        by_handler: collections.Counter[str] = collections.Counter()
        metadata = 0
        # A frame py-spy read mid-change can come out as raw bytes with a line break in them
        # (one run died on it): its pieces are not "stack count" lines and are left out.
        for line in self.output.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            by_handler[handler_of(stack)] += int(count)
            metadata += int(count) if INDEX_METADATA in stack else 0
        total = sum(by_handler.values()) or 1
        top = by_handler.most_common(6)
        shares = ", ".join(f"{name} {n / total:.2f}" for name, n in top)
        return f"{shares}; index definitions read per document written {metadata / total:.2f}"


#: The embedded server reads and decodes every index definition of a collection, several times
#: for each document it inserts or updates: what a secondary index costs a write there.
INDEX_METADATA = "_iter_indexes (secantus/storage.py"


def handler_of(stack: str) -> str:
    """The command handler a sampled stack was in: the frame the server's dispatch called."""
    frames = stack.split(";")
    for caller, callee in itertools.pairwise(frames):
        if caller.startswith("dispatch (secantus/commands.py"):
            return callee.split(" (", 1)[0]
    return "outside commands (wire, sessions, change streams)"


@contextlib.contextmanager
def database_uri(storage: Storage = "disk") -> Iterator[str]:
    """MONGODB_URI if set, else an embedded server of its own, on disk (what ``make run`` uses:
    WiredTiger files in a directory) or in memory."""
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
        return
    with contextlib.ExitStack() as stack:
        path = ":memory:"
        if storage == "disk":
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="swamp-bench-"))
        with EmbeddedDb(storage_path=path) as db:
            if db._process is not None:
                SERVER_PIDS[db.uri] = db._process.pid
            yield db.uri


def storage_label(storage: Storage) -> str:
    if os.environ.get("MONGODB_URI"):
        return "MONGODB_URI deployment"
    return {"disk": "embedded, on disk", "memory": "embedded, in memory"}[storage]


def telemetry_settings(uri: str, **extra: Any) -> TelemetrySettings:
    """Telemetry settings on fresh, uniquely named databases (dropped by the bench after)."""
    name = uuid.uuid4().hex[:6]
    return TelemetrySettings(
        MONGODB_URI=uri, TELEMETRY_DB=f"bench_t_{name}", BUS_DB=f"bench_b_{name}", **extra
    )


@contextlib.asynccontextmanager
async def scratch_databases(client: Client, *names: str) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for name in names:
            await client.drop_database(name)


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    """Median and range of repeated measurements."""
    return f"{statistics.median(values):,.0f} (min {min(values):,.0f}, max {max(values):,.0f})"


@dataclass(frozen=True)
class Baseline:
    """Raw insert_many of the same documents on the same server in the same run: docs/s in one
    call and in calls of 25, and in one call into a collection with the indexes ``events`` has
    (what storing them costs before any of the pipeline's work), and into one with the four
    indexes it had until the events set aside moved to a collection of their own (what the three
    partial and sparse ones for those few events cost every event on a server that keeps a key
    for every document in them, as SecantusDB does: tests/test_embedded_gaps.py), each the
    median of ``BASELINE_REPETITIONS`` timed runs."""

    one_call: list[float]
    calls_of_25: list[float]
    indexed: list[float]
    older_indexes: list[float]

    @classmethod
    def pooled(cls, baselines: list[Baseline]) -> Baseline:
        """Every repetition of several baselines of the same documents taken in one run: one
        baseline's median moves by 1.7x between two of them here, which would move a ratio
        against it as much."""
        return cls(
            [rate for b in baselines for rate in b.one_call],
            [rate for b in baselines for rate in b.calls_of_25],
            [rate for b in baselines for rate in b.indexed],
            [rate for b in baselines for rate in b.older_indexes],
        )

    @property
    def rate(self) -> float:
        return statistics.median(self.one_call)

    @property
    def rate_25(self) -> float:
        return statistics.median(self.calls_of_25)

    @property
    def rate_indexed(self) -> float:
        return statistics.median(self.indexed)


async def raw_baseline(client: Client, db: str, documents: list[dict[str, Any]]) -> Baseline:
    """Run with no change stream open (the services are stopped): the floor the pipeline is
    measured against. Each repetition writes into a fresh collection."""
    one: list[float] = []
    small: list[float] = []
    indexed: list[float] = []
    older: list[float] = []
    collection = client[db]["raw_copy"]
    runs = (
        (len(documents), one, []),
        (REQUEST_SIZE, small, []),
        (len(documents), indexed, event_indexes()),
        (len(documents), older, [*event_indexes(), *OLDER_RELEASE_ASIDE_INDEXES]),
    )
    for _ in range(BASELINE_REPETITIONS):
        for calls, rates, indexes in runs:
            await collection.drop()
            if indexes:
                await collection.create_indexes(indexes)
            with Stopwatch() as clock:
                for start in range(0, len(documents), calls):
                    await collection.insert_many(documents[start : start + calls], ordered=False)
            rates.append(len(documents) / clock.seconds)
    await collection.drop()
    return Baseline(one, small, indexed, older)


@dataclass
class Results:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_after: tuple[float, float, float] | None = None

    def add(self, metric: str, value: float | str, unit: str = "") -> None:
        text = value if isinstance(value, str) else f"{value:,.3f}".rstrip("0").rstrip(".")
        self.rows.append((metric, f"{text} {unit}".strip()))

    def finish(self) -> Results:
        """The scenario is over: its load average after is taken now, not when written."""
        self.load_after = os.getloadavg()
        return self

    def markdown(self) -> str:
        after = _load(self.load_after)
        load = f"load average (1/5/15 min) before {_load(self.load_before)}, after {after}"
        lines = [f"### {self.title}", "", f"Machine {load}.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {metric} | {value} |" for metric, value in self.rows]
        return "\n".join(lines) + "\n"


def _load(values: tuple[float, float, float] | None = None) -> str:
    return " / ".join(f"{v:.2f}" for v in (values or os.getloadavg()))


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


async def server_version(uri: str) -> str:
    client = observer_client(uri)
    try:
        info = await client.admin.command("buildInfo")
        return str(info.get("version", "unknown"))
    finally:
        await client.close()


def environment(server: str, storages: list[Storage], argv: list[str]) -> str:
    # Uncommitted changes to code (the docs may be edited while the bench runs).
    changed = _git("status", "--porcelain", "--", ".", ":!*.md")
    dirty = " (with uncommitted changes)" if changed else ""
    database = (
        "MONGODB_URI deployment"
        if os.environ.get("MONGODB_URI")
        else f"embedded SecantusDB {_version('SecantusDB')} (separate process)"
    )
    rows = [
        ("commit", f"`{_git('rev-parse', '--short=12', 'HEAD')}`{dirty}"),
        ("date", f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"),
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"),
        ("Python / driver", f"{platform.python_version()} / PyMongo {pymongo.version}"),
        ("server", f"{database}, reports version {server}"),
        ("storage modes", ", ".join(storage_label(s) for s in storages)),
        ("baseline repetitions", f"{BASELINE_REPETITIONS} (median reported)"),
        ("command", "`" + " ".join(["python -m bench", *argv]) + "`"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def write_results(
    results: list[Results], header: str, path: Path = Path("bench/RESULTS.md")
) -> None:
    body = "\n".join(r.markdown() for r in results)
    path.write_text(
        "# Benchmark results\n\n"
        "Written by `make bench`. Absolute rates on this shared machine are noise; read the "
        "ratios (measured in the same run, on the same server) and the DB commands per unit of "
        "work (the services' clients only; the bench's observer is not counted).\n\n"
        f"{header}\n\n{body}"
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
