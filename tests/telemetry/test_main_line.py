"""The watcher's main line: a high-water mark over the arrival sequence (processing/progress.py).

No event is written after its insert; the mark moves in the batch's transaction; it waits at a
number still being inserted, skips holes that can never fill at once, and applies events that
land late in a hole it skipped, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import monitoring
from pymongo.errors import AutoReconnect

from shared_contracts import failpoints
from shared_contracts.keys import api_key_hash
from shared_contracts.mongo import make_client
from telemetry_service.collections import EVENTS, EVENTS_ASIDE, PROGRESS, USER_METRICS
from telemetry_service.devices.store import devices_of_user
from telemetry_service.ingest import arrival
from telemetry_service.processing import progress as main_line
from telemetry_service.processing import watcher as watcher_module
from telemetry_service.processing.aside import adopt_older_release
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.projection.verify import verify
from telemetry_service.runtime import TelemetryRuntime
from tests.support import (
    SeenCommands,
    SeenFilters,
    applied_events,
    assert_planned_on_an_index,
    eventually,
    expire_watcher_leases,
    unapplied_events,
)
from tests.telemetry.conftest import Telemetry, cli_event

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def replica(telemetry: Telemetry, **overrides: Any) -> IngestWatcher:
    settings_ = telemetry.runtime.settings.model_copy(update=overrides)
    return IngestWatcher(TelemetryRuntime(settings=settings_, client=telemetry.runtime.client))


async def reserve_without_inserting(telemetry: Telemetry, count: int) -> int:
    """A request that reserved its numbers and has not inserted yet (or never will)."""
    return await arrival.reserve(telemetry.runtime.db, count)


async def insert_late(telemetry: Telemetry, first: int, device: str, count: int) -> None:
    """That request's insert lands now, as POST /ingest stores it."""
    documents = []
    for n in range(count):
        event = cli_event(device)
        documents.append(
            {"_id": event["insert_id"], "raw": event, "distinctId": device, "keyHash": None,
             "receivedAt": datetime.now(UTC), "seq": first + n}
        )  # fmt: skip
    await telemetry.runtime.db[EVENTS].insert_many(documents)


async def crash_before_commit(watcher: IngestWatcher, db: Any) -> None:
    """One main-line batch that dies just before its commit; its lease then runs out."""
    failpoints.arm(watcher_module.BEFORE_COMMIT, times=1)
    try:
        await watcher.main_line_batch()
    except failpoints.FailpointError:
        pass
    finally:
        failpoints.disarm()
    await expire_watcher_leases(db)


async def mark(telemetry: Telemetry) -> main_line.Progress:
    document = await telemetry.runtime.db[PROGRESS].find_one({"_id": "arrival"})
    return main_line.Progress.from_document(document)


async def batches(telemetry: Telemetry) -> int:
    """Main-line batches committed (the progress document counts them)."""
    document = await telemetry.runtime.db[PROGRESS].find_one({"_id": "arrival"})
    assert document is not None
    return int(document.get("batches", 0))


async def anonymous(telemetry: Telemetry, device: str) -> int:
    return int((await telemetry.device(device)).json()["anonymous"]["invocations"])


class EventWrites(monitoring.CommandListener):
    """Writes to the events collection, by command."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.seen_any = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.seen_any = True
        writes = event.command_name in {"update", "findAndModify", "delete"}
        if writes and event.command.get(event.command_name) == EVENTS:
            self.commands.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@contextlib.asynccontextmanager
async def listened_to(
    telemetry: Telemetry, mongo_uri: str, listener: monitoring.CommandListener, **overrides: Any
) -> AsyncIterator[IngestWatcher]:
    """A watcher whose client reports its commands to ``listener`` (a listener registered
    globally reaches only clients created after it, never the fixture's)."""
    client: Any = make_client(mongo_uri, app_name="main-line-listened", event_listeners=[listener])
    settings_ = telemetry.runtime.settings.model_copy(update=overrides)
    try:
        yield IngestWatcher(TelemetryRuntime(settings=settings_, client=client))
    finally:
        await client.close()


async def test_applied_events_are_never_written_again(telemetry: Telemetry, mongo_uri: str) -> None:
    """The point of the mark: an event is written once, by its insert."""
    _, key = await telemetry.register("wendy")
    await telemetry.post({"events": [cli_event("w1") for _ in range(20)]}, key)
    await telemetry.post({"events": [cli_event("w2") for _ in range(5)]})
    before = {d["_id"]: d async for d in telemetry.runtime.db[EVENTS].find()}
    writes = EventWrites()
    async with listened_to(telemetry, mongo_uri, writes) as watcher:
        assert await watcher.drain() == 25
    assert writes.seen_any, "the listener saw none of the watcher's commands"
    assert writes.commands == []
    after = {d["_id"]: d async for d in telemetry.runtime.db[EVENTS].find()}
    assert after == before
    assert (await telemetry.stats("wendy"))["totalInvocations"] == 20
    progress = await mark(telemetry)
    assert progress.through == max(d["seq"] for d in after.values())
    assert progress.gaps == []


async def test_a_resent_duplicate_leaves_a_known_hole_the_mark_passes_at_once(
    telemetry: Telemetry,
) -> None:
    first, again = cli_event("dup-dev"), cli_event("dup-dev")
    await telemetry.post({"events": [first, again]})
    resent = await telemetry.post({"events": [first, cli_event("dup-dev")]})  # one duplicate
    assert resent.json() == {"accepted": 1, "duplicates": 1}
    await telemetry.post(cli_event("dup-dev"))
    await telemetry.watcher.drain()  # the gap wait is 15 s: no waiting here
    assert await anonymous(telemetry, "dup-dev") == 4
    assert await unapplied_events(telemetry.runtime.db) == 0
    assert (await mark(telemetry)).gaps == []  # known never to fill: nothing to look at later


async def test_the_mark_waits_at_a_number_still_being_inserted(telemetry: Telemetry) -> None:
    await telemetry.post(cli_event("slow-dev"))
    slow = await reserve_without_inserting(telemetry, 2)
    await telemetry.post(cli_event("slow-dev"))  # a later request, stored first
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "slow-dev") == 1  # only the one before the hole
    assert (await mark(telemetry)).through == slow - 1
    await insert_late(telemetry, slow, "slow-dev", 2)
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "slow-dev") == 4
    assert await unapplied_events(telemetry.runtime.db) == 0


async def test_a_hole_older_than_the_gap_wait_is_skipped_and_a_late_event_still_counts(
    telemetry: Telemetry,
) -> None:
    """A request that reserved and then died (or hangs) does not stop the main line for longer
    than INGEST_GAP_WAIT_SECONDS; if its insert lands after all, its events are applied then,
    once, and leave the remembered gap."""
    hole = await reserve_without_inserting(telemetry, 3)
    await telemetry.post(cli_event("gap-dev"))
    impatient = replica(telemetry, ingest_gap_wait_seconds=0.001)
    await impatient.drain()  # first sight of the hole
    await impatient.drain()  # older than the wait now: skipped
    assert await anonymous(telemetry, "gap-dev") == 1
    progress = await mark(telemetry)
    assert [(g.first, g.last) for g in progress.gaps] == [(hole, hole + 2)]
    await insert_late(telemetry, hole + 1, "gap-dev", 1)  # the middle one lands late
    await impatient.drain()
    await impatient.drain()
    assert await anonymous(telemetry, "gap-dev") == 2
    progress = await mark(telemetry)
    assert [(g.first, g.last) for g in progress.gaps] == [(hole, hole), (hole + 2, hole + 2)]
    assert await unapplied_events(telemetry.runtime.db) == 0


def test_a_remembered_gap_is_forgotten_after_gap_keep() -> None:
    progress = main_line.Progress(10, [main_line.Gap(3, 4, NOW - main_line.GAP_KEEP)])
    step = main_line.step(progress, [{"seq": 11}], hole_ready=lambda *_: "old", now=NOW)
    assert step.to == main_line.Progress(11, [], 0)


@settings(max_examples=200, deadline=None)
@given(
    through=st.integers(0, 20),
    present=st.sets(st.integers(-5, 60), max_size=30),
    ready=st.sets(st.integers(0, 60)),
    never_fills=st.sets(st.integers(0, 60)),
    gap_numbers=st.sets(st.integers(0, 20), max_size=6),
)
def test_the_mark_never_passes_a_hole_that_is_not_ready(
    through: int, present: set[int], ready: set[int], never_fills: set[int], gap_numbers: set[int]
) -> None:
    """step() over any stored numbers and any readiness: events are taken in arrival order; the
    mark passes exactly the events taken and the ready holes; numbers in remembered gaps are
    taken whenever present; every passed number is taken, a known gap, or ready."""
    gaps = [main_line.Gap(n, n, NOW) for n in sorted(gap_numbers) if n <= through]
    progress = main_line.Progress(through, gaps)
    visible = sorted(n for n in present if n > through or n in gap_numbers)
    documents = [{"seq": n} for n in visible]

    def verdict(first: int, last: int) -> main_line.HoleVerdict:
        return "never_fills" if first in never_fills else "old" if first in ready else None

    step = main_line.step(progress, documents, hole_ready=verdict, now=NOW)
    taken = [d["seq"] for d in step.take]
    assert taken == sorted(taken)
    assert step.to.through >= through
    assert {n for n in visible if n <= through} <= set(taken)  # late arrivals in gaps
    above = [n for n in taken if n > through]
    assert above == [n for n in visible if through < n <= step.to.through]
    remembered = {n for g in step.to.gaps for n in range(g.first, g.last + 1)}
    passable = ready | never_fills
    # Each hole the mark passed (a run of numbers it passed without events) was passable.
    passed_without = [n for n in range(through + 1, step.to.through + 1) if n not in above]
    starts = [n for n in passed_without if n - 1 not in passed_without]
    assert set(starts) <= passable
    for g in step.to.gaps:
        if g.first > through:  # remembered only when passed for its age
            assert g.first in ready
            assert g.first not in never_fills
    assert not remembered & set(taken)
    if step.waiting_at is not None:
        assert step.waiting_at == step.to.through + 1
        assert step.waiting_at not in passable


async def test_a_batch_that_kills_its_worker_again_and_again_is_moved_aside(
    telemetry: Telemetry,
) -> None:
    """Each attempt dies inside the transaction (the process is killed, no error to blame).
    After two, the main line hands the batch to the aside claim, which has per-event attempts
    and isolation; the mark moves on, and every event is applied exactly once."""
    _, key = await telemetry.register("xena")
    await telemetry.post({"events": [cli_event("x1") for _ in range(6)]}, key)
    failpoints.arm(watcher_module.BEFORE_COMMIT, times=2)
    try:
        for _ in range(2):
            with pytest.raises(failpoints.FailpointError):
                await IngestWatcher(telemetry.runtime).main_line_batch()
            await expire_watcher_leases(telemetry.runtime.db)
    finally:
        failpoints.disarm()
    assert (await mark(telemetry)).attempts == 2
    await IngestWatcher(telemetry.runtime).drain()
    assert (await telemetry.stats("xena"))["totalInvocations"] == 6
    assert await applied_events(telemetry.runtime.db) == 6
    aside = await telemetry.runtime.db[EVENTS_ASIDE].count_documents({"processed": True})
    assert aside == 6  # applied by the aside claim
    progress = await mark(telemetry)
    assert progress.attempts == 0
    await telemetry.post(cli_event("x1"), key)  # the main line goes on
    await telemetry.watcher.drain()
    assert (await telemetry.stats("xena"))["totalInvocations"] == 7


async def test_an_idle_worker_does_not_keep_the_main_line(telemetry: Telemetry) -> None:
    first, second = IngestWatcher(telemetry.runtime), IngestWatcher(telemetry.runtime)
    await telemetry.post(cli_event("idle-dev"))
    await first.drain()  # applies, then finds nothing and lets go
    await telemetry.post(cli_event("idle-dev"))
    assert await second.main_line_batch() == 1
    assert await anonymous(telemetry, "idle-dev") == 2


async def test_events_arriving_while_the_watcher_lingers_join_one_batch(
    telemetry: Telemetry,
) -> None:
    """After a batch the running watcher waits INGEST_BATCH_LINGER_SECONDS: the app claims the
    refreshes the batch published before the next batch holds them, and what arrives meanwhile
    is applied together. ``stop`` cuts the pause short."""
    watcher = replica(telemetry, ingest_batch_linger_seconds=3.0)
    running = asyncio.create_task(watcher.run())
    try:
        await telemetry.post(cli_event("linger-dev"))
        await eventually(lambda: _none_unapplied(telemetry))
        before = await batches(telemetry)
        for _ in range(3):  # one request each, while the watcher lingers
            assert (await telemetry.post(cli_event("linger-dev"))).status_code == 202
        await eventually(lambda: _none_unapplied(telemetry), within=15)
        assert await batches(telemetry) == before + 1
    finally:
        watcher.stop()
        await asyncio.wait_for(running, timeout=2)  # well inside the 3 s pause
    assert await anonymous(telemetry, "linger-dev") == 4


@pytest.mark.parametrize("linger", [None, 0.0, 5.0])
async def test_a_watcher_stopped_after_a_batch_lets_go_of_the_main_line(
    telemetry: Telemetry, linger: float | None
) -> None:
    """Found by attacking the linger: stopped in the pause after a batch, the watcher left
    holding the main line, and the replica replacing it in a rolling deploy applied nothing
    until the lease ran out (60 s by default). Before the linger the next, empty, batch let go
    of it within milliseconds. ``None``: the default linger, stopped right after the batch."""
    overrides = {} if linger is None else {"ingest_batch_linger_seconds": linger}
    watcher = replica(telemetry, **overrides)
    running = asyncio.create_task(watcher.run())
    await telemetry.post(cli_event("handover"))
    await eventually(lambda: _none_unapplied(telemetry), interval=0.005)
    if linger is not None:
        await asyncio.sleep(0.3)  # idle (linger 0) or still in the pause (linger 5)
    watcher.stop()
    await asyncio.wait_for(running, timeout=2)
    await telemetry.post(cli_event("handover"))
    assert await IngestWatcher(telemetry.runtime).drain() == 1, "the main line is still leased"
    assert await anonymous(telemetry, "handover") == 2
    progress = await telemetry.runtime.db[PROGRESS].find_one({"_id": "arrival"})
    assert progress is not None
    assert progress["attempts"] == 0  # letting go is no attempt given back


@contextlib.asynccontextmanager
async def other_replica(
    telemetry: Telemetry, mongo_uri: str, seen: SeenCommands
) -> AsyncIterator[IngestWatcher]:
    """A second replica's watcher running beside the test, its lease tries counted; it polls
    once a second."""
    client = make_client(mongo_uri, app_name="other-replica", event_listeners=[seen])
    update = {"ingest_lease_seconds": 30, "ingest_poll_interval_seconds": 1.0}
    other = IngestWatcher(
        TelemetryRuntime(settings=telemetry.runtime.settings.model_copy(update=update),
                         client=client)
    )  # fmt: skip
    running = asyncio.create_task(other.run())
    try:
        await eventually(lambda: _at_least(seen.count("findAndModify", PROGRESS), 1))
        yield other
    finally:
        other.stop()
        await asyncio.wait_for(running, timeout=20)
        await client.close()


async def test_a_replica_without_the_main_line_is_not_woken_by_each_insert(
    telemetry: Telemetry, mongo_uri: str
) -> None:
    """Every insert used to wake every replica to fail to take the lease: on one server, that
    is what more replicas cost. Now only the holder is woken; the others try once a poll
    interval, and take over when the lease runs out if the holder is gone (as after a
    crash)."""
    db = telemetry.runtime.db
    await telemetry.post(cli_event("held-dev"))
    assert await main_line.lease(db, owner="gone-holder", seconds=3) is not None
    seen = SeenCommands()
    started = time.monotonic()
    async with other_replica(telemetry, mongo_uri, seen):
        for _ in range(10):
            assert (await telemetry.post(cli_event("held-dev"))).status_code == 202
        await asyncio.sleep(0.5)
        polls = (time.monotonic() - started) // 1.0
        assert seen.count("findAndModify", PROGRESS) <= 2 + polls, (
            "woken by inserts to fail to take the lease"
        )
        # The holder never renews: once its lease ran out, the other replica applies it all.
        await eventually(lambda: _none_unapplied(telemetry), within=30)
    assert await anonymous(telemetry, "held-dev") == 11


async def test_a_holder_that_let_go_when_idle_and_went_away_is_replaced_within_a_poll(
    telemetry: Telemetry, mongo_uri: str
) -> None:
    """Found by attacking the above: a replica that slept until the holder's lease would end
    left new events waiting that long (60 s by default) when the holder had released it,
    idle, and then gone away."""
    db = telemetry.runtime.db
    assert await main_line.lease(db, owner="holder", seconds=30) is not None
    seen = SeenCommands()
    async with other_replica(telemetry, mongo_uri, seen):
        await main_line.release(db, owner="holder")  # idle, then gone
        assert (await telemetry.post(cli_event("late-dev"))).status_code == 202
        await eventually(lambda: _none_unapplied(telemetry), within=10)


async def _at_least(value: int, least: int) -> bool:
    return value >= least


async def _none_unapplied(telemetry: Telemetry) -> bool:
    return await unapplied_events(telemetry.runtime.db) == 0


async def test_events_stored_by_the_previous_release_are_applied_aside(
    telemetry: Telemetry,
) -> None:
    """Rolling upgrade: an older replica's watcher, still running, keeps an event aside in
    ``events`` (processed=false), numbered above the mark. The main line passes it without
    applying it, it counts as unapplied (and ``verify`` names it) until it is adopted
    (``swamp-club events adopt``); then the aside claim applies it, once."""
    await telemetry.post(cli_event("mixed-release"))
    first = await arrival.reserve(telemetry.runtime.db, 1)
    event = cli_event("mixed-release")
    await telemetry.runtime.db[EVENTS].insert_one(
        {"_id": event["insert_id"], "raw": event, "distinctId": "mixed-release", "keyHash": None,
         "receivedAt": datetime.now(UTC) - timedelta(seconds=1), "processed": False,
         "leaseUntil": datetime(1970, 1, 1, tzinfo=UTC), "seq": first}
    )  # fmt: skip
    await telemetry.post(cli_event("mixed-release"))
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "mixed-release") == 2
    assert await unapplied_events(telemetry.runtime.db) == 1
    report = await verify(telemetry.runtime.db, telemetry.runtime.bus)
    assert report.not_adopted_events == 1
    assert not report.clean
    assert await adopt_older_release(telemetry.runtime.db, look=True) == 1
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "mixed-release") == 3
    assert await unapplied_events(telemetry.runtime.db) == 0
    assert await adopt_older_release(telemetry.runtime.db, look=True) == 0  # once


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    program=st.lists(
        st.sampled_from(["post", "resend", "reserve", "land", "drain", "crash", "wait"]),
        min_size=1,
        max_size=25,
    )
)
async def test_any_interleaving_of_requests_holes_crashes_and_drains_counts_each_event_once(
    telemetry: Telemetry, program: list[str]
) -> None:
    """Requests, re-sent duplicates, reservations whose insert lands later (or never), watcher
    crashes mid-transaction and passes of the gap wait, in any order: at the end, every stored
    event is counted exactly once and none is left behind (I2)."""
    db = telemetry.runtime.db
    device = f"prog-{datetime.now(UTC).timestamp()}"
    sent: list[dict[str, Any]] = []
    pending: list[int] = []
    impatient = False

    def watcher() -> IngestWatcher:
        return replica(telemetry, ingest_gap_wait_seconds=0.001 if impatient else 15.0)

    for action in program:
        if action == "post":
            events = [cli_event(device) for _ in range(2)]
            sent += events
            await telemetry.post({"events": events})
        elif action == "resend" and sent:
            await telemetry.post({"events": [sent[-1], cli_event(device)]})
            sent.append({})  # the fresh one: counted below from the collection anyway
        elif action == "reserve":
            pending.append(await reserve_without_inserting(telemetry, 1))
        elif action == "land" and pending:
            await insert_late(telemetry, pending.pop(0), device, 1)
        elif action == "drain":
            await watcher().drain()
        elif action == "crash":
            await crash_before_commit(watcher(), db)
        elif action == "wait":
            impatient = True
    for number in pending:  # the rest land at last
        await insert_late(telemetry, number, device, 1)
    impatient = True
    for _ in range(3):
        await expire_watcher_leases(db)
        await watcher().drain()
    stored = await db[EVENTS].count_documents({"distinctId": device})
    assert await anonymous(telemetry, device) == stored if stored else True
    assert await unapplied_events(db) == 0


async def test_a_batch_is_the_backlog_up_to_the_largest_batch(telemetry: Telemetry) -> None:
    """A backlog of 30 with INGEST_MAX_BATCH_SIZE 8 is 8, 8, 8, 6 events whatever
    INGEST_BATCH_SIZE (the aside claims' size); caught up, a batch is what arrived. One refresh
    per batch at most, coalesced while pending."""
    _, key = await telemetry.register("yara")
    await telemetry.post({"events": [cli_event("y1") for _ in range(30)]}, key)
    watcher = replica(telemetry, ingest_batch_size=2, ingest_max_batch_size=8)
    sizes = []
    while handled := await watcher.main_line_batch():
        sizes.append(handled)
    assert sizes == [8, 8, 8, 6]
    assert (await telemetry.stats("yara"))["totalInvocations"] == 30
    refreshes = await telemetry.refreshes((await telemetry.stats("yara"))["userId"])
    assert len(refreshes) <= 4
    await telemetry.post({"events": [cli_event("y1") for _ in range(3)]}, key)
    assert await watcher.main_line_batch() == 3
    assert (await telemetry.stats("yara"))["totalInvocations"] == 33


class MainLineReads(monitoring.CommandListener):
    """The main line's reads of events by arrival range (a limited find, unlike the reads of a
    batch's devices), each with how many it returned."""

    def __init__(self) -> None:
        self.filters: dict[int, dict[str, Any]] = {}
        self.reads: list[tuple[dict[str, Any], int]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        query = event.command.get("filter")
        ranged = isinstance(query, dict) and set(query) == {"seq"}
        # Limited: above_mark's reads, not those of a batch's devices.
        limited = event.command_name == "find" and bool(event.command.get("limit"))
        if limited and ranged and event.command.get("find") == EVENTS:
            self.filters[event.request_id] = query["seq"]

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if (bounds := self.filters.pop(event.request_id, None)) is not None:
            self.reads.append((bounds, len(event.reply["cursor"]["firstBatch"])))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.filters.pop(event.request_id, None)


async def test_the_main_line_reads_a_window_of_the_largest_batch(
    telemetry: Telemetry, mongo_uri: str
) -> None:
    """A batch reads the next INGEST_MAX_BATCH_SIZE arrival numbers, never everything above
    the mark: the embedded server reads all an open range matches before it applies the
    limit, so draining a backlog of N in batches of B read N²/2B events (bench/ingest.py)."""
    _, key = await telemetry.register("vera")
    await telemetry.post({"events": [cli_event("v1") for _ in range(25)]}, key)
    await telemetry.post({"events": [cli_event("v1") for _ in range(5)]})
    reads = MainLineReads()
    async with listened_to(telemetry, mongo_uri, reads, ingest_max_batch_size=8) as watcher:
        sizes = [handled async for handled in _batches(watcher)]
    assert sizes == [8, 8, 8, 6]
    windows = [(b["$lte"] - b["$gt"], n) for b, n in reads.reads if "$lte" in b]
    assert windows[:4] == [(8, 8), (8, 8), (8, 8), (8, 6)], reads.reads
    # An open range only after a window that held nothing (here: once caught up).
    assert all(n == 0 for b, n in reads.reads if "$lte" not in b), reads.reads
    assert (await telemetry.stats("vera"))["totalInvocations"] == 30  # she owns v1


async def _batches(watcher: IngestWatcher) -> AsyncIterator[int]:
    while handled := await watcher.main_line_batch():
        yield handled


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-holes", "in-flight-holes"])
async def test_a_run_of_holes_longer_than_a_batch_does_not_stop_the_main_line(
    telemetry: Telemetry, recorded: bool
) -> None:
    """Twenty numbers that never hold an event (re-sent duplicates' numbers recorded as holes,
    or a reservation whose insert never came) and then events: with batches of 8 the window
    above the mark holds nothing, and the main line still reaches the events beyond it."""
    await telemetry.post(cli_event("h1"))
    hole = await reserve_without_inserting(telemetry, 20)
    if recorded:
        await arrival.record_holes(telemetry.runtime.db, list(range(hole, hole + 20)))
    await telemetry.post({"events": [cli_event("h1") for _ in range(3)]})
    watcher = replica(telemetry, ingest_max_batch_size=8, ingest_gap_wait_seconds=0)
    await watcher.drain()
    assert await anonymous(telemetry, "h1") == 4
    assert await unapplied_events(telemetry.runtime.db) == 0
    progress = await mark(telemetry)
    assert progress.through == hole + 22
    # Recorded holes never fill: nothing to look at later. An unrecorded one may still land.
    skipped = [(gap.first, gap.last) for gap in progress.gaps]
    assert skipped == ([] if recorded else [(hole, hole + 19)])


async def test_database_blips_before_a_batch_is_tried_never_count_as_its_attempts(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FOUND by a review: the lease counts an attempt; a failure before anything was applied (a
    blip while reading above the mark, here nine while idle) was never given back, so the next
    healthy batch was moved aside untried with the whole drift as its attempts, and set aside
    dead without ever being applied."""
    real = main_line.above_mark
    blips = {"left": 9}

    async def blipping(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if blips["left"]:
            blips["left"] -= 1
            raise AutoReconnect("blip")
        return await real(*args, **kwargs)

    monkeypatch.setattr(main_line, "above_mark", blipping)
    watcher = IngestWatcher(telemetry.runtime)
    for _ in range(9):
        with pytest.raises(AutoReconnect):
            await watcher.main_line_batch()
    assert (await mark(telemetry)).attempts == 0
    _, key = await telemetry.register("drift")
    await telemetry.post({"events": [cli_event("drift-dev") for _ in range(3)]}, key)
    await watcher.drain()
    assert await telemetry.runtime.db[EVENTS_ASIDE].count_documents({"dead": True}) == 0
    assert (await telemetry.stats("drift"))["totalInvocations"] == 3


async def test_an_older_releases_event_does_not_overtake_an_earlier_one_on_the_main_line(
    telemetry: Telemetry,
) -> None:
    """FOUND by a review (rolling upgrade, I3): the new release stores alice's event on a new
    device; a replica of the previous release then stores bob's there, marked processed=false,
    so it is claimed aside (once adopted), and the aside pass ran first: bob owned the device
    alice's authenticated event had reached first."""
    alice, alice_key = await telemetry.register("alice")
    _, bob_key = await telemetry.register("bobby")
    await telemetry.post(cli_event("upgrade-dev"), alice_key)
    number = await arrival.reserve(telemetry.runtime.db, 1)
    event = cli_event("upgrade-dev")
    await telemetry.runtime.db[EVENTS].insert_one(
        {"_id": event["insert_id"], "raw": event, "distinctId": "upgrade-dev",
         "keyHash": api_key_hash(bob_key), "receivedAt": datetime.now(UTC), "processed": False,
         "leaseUntil": datetime(1970, 1, 1, tzinfo=UTC), "seq": number}
    )  # fmt: skip
    assert await adopt_older_release(telemetry.runtime.db, look=True) == 1
    await telemetry.watcher.drain()
    await expire_watcher_leases(telemetry.runtime.db)  # bob's waited its retry interval
    await telemetry.watcher.drain()
    assert await unapplied_events(telemetry.runtime.db) == 0
    device = (await telemetry.device("upgrade-dev")).json()
    assert device["ownerUserId"] == alice


main_line_states = st.dictionaries(
    keys=st.integers(-3, 40),  # arrival numbers; negative: numbered from an older release
    values=st.tuples(
        st.sampled_from(["d0", "d1", "d2"]),
        st.sampled_from(["main", "aside", "applied aside", "dead", "old"]),
    ),
    max_size=30,
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    events=main_line_states,
    through=st.integers(-3, 40),
    gaps=st.lists(st.tuples(st.integers(-3, 40), st.integers(0, 3)), max_size=3),
    devices=st.sets(st.sampled_from(["d0", "d1", "d2"]), min_size=1),
    below=st.integers(-3, 45),
    limit=st.integers(1, 40),
)
async def test_the_watcher_s_reads_select_what_the_unapplied_query_selects(
    telemetry: Telemetry,
    events: dict[int, tuple[str, str]],
    through: int,
    gaps: list[tuple[int, int]],
    devices: set[str],
    below: int,
    limit: int,
) -> None:
    """above_mark and unapplied_on_devices read range by range, without an $or (the embedded
    server plans none): whatever the events, the mark and its gaps, they select exactly what the
    one-query definitions select. Above the mark, above_mark reads a window of ``limit`` arrival
    numbers (or, when the window holds no event, the first ``limit`` beyond it): what it returns
    is always the start of what is in reach, never skipping one, and never nothing while
    anything is in reach."""
    db = telemetry.runtime.db
    await db[EVENTS].drop()
    await db[EVENTS_ASIDE].drop()
    remembered = [main_line.Gap(first, min(first + width, through), NOW)
                  for first, width in gaps if first <= through]  # fmt: skip
    progress = main_line.Progress(through, remembered)
    stored = {"_id": "arrival", "through": through, "gaps": [g.to_document() for g in remembered]}
    await db[PROGRESS].replace_one({"_id": "arrival"}, stored, upsert=True)
    if events:
        old = {"processed": True}  # an older release's: applied, or adopted aside
        await db[EVENTS].insert_many(
            [{"_id": f"e{seq}", "seq": seq, "distinctId": device, **(old if state == "old" else {})}
             for seq, (device, state) in events.items()]
        )  # fmt: skip
        copies = {"aside": {"processed": False}, "applied aside": {"processed": True},
                  "dead": {"processed": False, "dead": True}}  # fmt: skip
        aside = [{"_id": f"e{seq}", "seq": seq, "distinctId": device, **copies[state]}
                 for seq, (device, state) in events.items() if state in copies]  # fmt: skip
        if aside:
            await db[EVENTS_ASIDE].insert_many(aside)

    in_reach = [
        seq for seq in sorted(events)
        if seq > through or any(g.first <= seq <= g.last for g in remembered)
    ]  # fmt: skip
    in_gaps = [seq for seq in in_reach if seq <= through]
    above = [seq for seq in in_reach if seq > through]
    window = [seq for seq in above if seq <= through + limit] or above[:limit]
    read = [d["seq"] for d in await main_line.above_mark(db, progress, limit=limit)]
    assert read == sorted(in_gaps + window)[:limit]
    assert read == in_reach[: len(read)]
    assert bool(read) == bool(in_reach)

    definition = {
        "$and": [main_line.unapplied_query(stored), {"distinctId": {"$in": sorted(devices)}}],
        "seq": {"$lt": below},
    }
    aside_definition = {
        **main_line.UNAPPLIED_ASIDE,
        "distinctId": {"$in": sorted(devices)},
        "seq": {"$lt": below},
    }
    expected = {d["_id"] async for d in db[EVENTS].find(definition)}
    expected |= {d["_id"] async for d in db[EVENTS_ASIDE].find(aside_definition)}
    async with telemetry.runtime.client.start_session() as session:
        found = await main_line.unapplied_on_devices(
            db, sorted(devices), below=below, session=session
        )
    assert {d["_id"] for d in found} == expected
    assert len(found) == len(expected)  # none twice


async def test_the_watcher_s_reads_of_events_are_planned_on_indexes(
    telemetry: Telemetry, mongo_uri: str
) -> None:
    """A remembered gap, and an authenticated event on a device without an owner behind an
    earlier keyed one: the watcher's reads above the mark, in the gap and of those devices are
    planned on indexes. With an $or they scanned every event stored (0.6 s at 20,000, inside the
    batch's transaction)."""
    db = telemetry.runtime.db
    seen = SeenFilters()
    client: Any = make_client(mongo_uri, app_name="main-line-plans", event_listeners=[seen])
    try:
        _, key = await telemetry.register("gwen")
        await telemetry.post(cli_event("plan-dev"))
        hole = await reserve_without_inserting(telemetry, 2)
        await telemetry.post(cli_event("plan-dev"))
        runtime = TelemetryRuntime(
            settings=telemetry.runtime.settings.model_copy(update={"ingest_gap_wait_seconds": 0}),
            client=client,
        )
        await IngestWatcher(runtime).drain()  # skips the hole: a remembered gap
        assert (await mark(telemetry)).gaps
        await insert_late(telemetry, hole, "plan-new", 1)  # lands late, in the gap
        await telemetry.post({"events": [cli_event("plan-new"), cli_event("plan-new")]}, key)
        await IngestWatcher(runtime).drain()
        await devices_of_user(runtime.db, "nobody")
    finally:
        await client.close()
    # The reads of this scenario: above the mark and in the gap, by range; of the devices,
    # aside and by range; a user's devices. (The aside claim's reads are planned on none, and
    # ride the partial "aside" index in execution: they read the events aside, however few.)
    ranges = [q for c, q in seen.filters if c == EVENTS and set(q) == {"seq"}]
    by_device = [q for c, q in seen.filters if c == EVENTS_ASIDE and set(q) == {"distinctId"}]
    devices = [
        q for c, q in seen.filters if c == USER_METRICS and set(q) <= {"userIds", "ownerUserId"}
    ]
    assert any("$gte" in q["seq"] for q in ranges), seen.filters  # a gap's range was read
    assert by_device, seen.filters
    assert len(devices) == 2, seen.filters
    assert not [q for c, q in seen.filters if c == EVENTS and "$or" in q], seen.filters
    reads = [(EVENTS, q) for q in ranges] + [(EVENTS_ASIDE, q) for q in by_device]
    for collection, query in reads + [(USER_METRICS, q) for q in devices]:
        await assert_planned_on_an_index(db, collection, query)
