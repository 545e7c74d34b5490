"""Concurrent /ingest requests stored together (ingest/group_commit.py): one reservation and one
insert per group, yet each request's answer, arrival numbers and failures are its own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.errors import AutoReconnect

from telemetry_service.collections import ARRIVAL_HOLES, EVENTS
from telemetry_service.ingest import arrival
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from tests.support import applied_events, eventually
from tests.telemetry.conftest import Telemetry, cli_event


class HeldReservations:
    """Counts reservations; the first ``holds`` of them wait until released (a write in flight).
    ``reached[k]`` is set when reservation k starts, ``release[k]`` lets it finish."""

    def __init__(self, holds: int = 1) -> None:
        self.calls = 0
        self.reached = {k: asyncio.Event() for k in range(1, holds + 1)}
        self.release = {k: asyncio.Event() for k in range(1, holds + 1)}
        self.real = arrival.reserve

    async def __call__(self, db: Any, count: int, **kwargs: Any) -> int:
        self.calls += 1
        call = self.calls
        first = await self.real(db, count, **kwargs)
        if call in self.reached:
            self.reached[call].set()
            await self.release[call].wait()
        return first

    @property
    def in_flight(self) -> asyncio.Event:
        return self.reached[1]

    @property
    def go_on(self) -> asyncio.Event:
        return self.release[1]


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> HeldReservations:
    reservations = HeldReservations()
    monkeypatch.setattr(arrival, "reserve", reservations)
    return reservations


async def waiting_behind(telemetry: Telemetry, count: int) -> None:
    """Until ``count`` requests wait for the write in flight."""
    writer = telemetry.runtime.event_writer

    async def waiting() -> bool:
        return len(writer._waiting) >= count

    await eventually(waiting, interval=0.001)


async def test_requests_that_arrive_during_a_write_are_stored_in_one_more(
    telemetry: Telemetry, held: HeldReservations
) -> None:
    first = asyncio.create_task(telemetry.post({"events": [cli_event("d0"), cli_event("d0")]}))
    await held.in_flight.wait()
    later = [
        asyncio.create_task(telemetry.post({"events": [cli_event(f"d{n}") for _ in range(3)]}))
        for n in range(1, 8)
    ]
    await waiting_behind(telemetry, 7)
    held.go_on.set()
    answers = [await first, *[await request for request in later]]
    assert [a.json() for a in answers] == [{"accepted": 2, "duplicates": 0}] + [
        {"accepted": 3, "duplicates": 0}
    ] * 7
    assert held.calls == 2  # one reservation for the first request, one for the seven after it
    # Numbered without a gap, each request's events consecutively, the first request's first
    # (the later seven reached the writer in whatever order their tasks ran).
    stored = await telemetry.runtime.db[EVENTS].find({}, {"seq": 1, "distinctId": 1}).to_list()
    by_seq = sorted(stored, key=lambda e: e["seq"])
    assert [e["seq"] for e in by_seq] == list(range(by_seq[0]["seq"], by_seq[0]["seq"] + 23))
    devices = [e["distinctId"] for e in by_seq]
    assert devices[:2] == ["d0", "d0"]
    blocks = [devices[i : i + 3] for i in range(2, 23, 3)]
    assert all(len(set(block)) == 1 for block in blocks)
    assert sorted(block[0] for block in blocks) == [f"d{n}" for n in range(1, 8)]


async def test_a_re_sent_request_in_a_group_is_answered_as_duplicates_and_leaves_holes(
    telemetry: Telemetry, held: HeldReservations
) -> None:
    sent = {"events": [cli_event("resent") for _ in range(4)]}
    blocker = asyncio.create_task(telemetry.post(cli_event("first")))
    await held.in_flight.wait()
    original = asyncio.create_task(telemetry.post(sent))
    await waiting_behind(telemetry, 1)
    again = asyncio.create_task(telemetry.post(sent))  # the CLI re-sent it, same ids
    fresh = asyncio.create_task(telemetry.post({"events": [cli_event("fresh")] * 1}))
    await waiting_behind(telemetry, 3)
    held.go_on.set()
    assert (await blocker).status_code == 202
    assert (await original).json() == {"accepted": 4, "duplicates": 0}
    assert (await again).json() == {"accepted": 0, "duplicates": 4}
    assert (await fresh).json() == {"accepted": 1, "duplicates": 0}
    # The re-sent copies' numbers never hold an event: recorded, so the mark need not wait.
    assert await telemetry.runtime.db[ARRIVAL_HOLES].count_documents({}) == 4
    await telemetry.drain()
    assert await applied_events(telemetry.runtime.db) == 6


async def test_a_failed_group_write_fails_each_of_its_requests_and_the_next_group_works(
    telemetry: Telemetry, held: HeldReservations, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = asyncio.create_task(telemetry.post(cli_event("first")))
    await held.in_flight.wait()
    doomed = [asyncio.create_task(telemetry.post(cli_event(f"doomed-{n}"))) for n in range(3)]
    await waiting_behind(telemetry, 3)
    real_insert = type(telemetry.runtime.db[EVENTS]).insert_many
    failures = iter([AutoReconnect("connection reset by the database")])

    async def insert_many(collection: Any, documents: Any, **kwargs: Any) -> Any:
        doomed = collection.name == EVENTS and documents[0]["distinctId"].startswith("doomed")
        if doomed and (failure := next(failures, None)):
            raise failure
        return await real_insert(collection, documents, **kwargs)

    monkeypatch.setattr(type(telemetry.runtime.db[EVENTS]), "insert_many", insert_many)
    held.go_on.set()
    assert (await blocker).status_code == 202
    answers = [await request for request in doomed]
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert all(a.json()["error"]["code"] == "database_unavailable" for a in answers)
    # Nothing of the failed group was stored; the next request is written as usual.
    assert await telemetry.runtime.db[EVENTS].count_documents({}) == 1
    assert (await telemetry.post(cli_event("after"))).status_code == 202
    # The failed group's numbers may or may not hold events (the insert's fate is unknown), so
    # the main line passes them only after INGEST_GAP_WAIT_SECONDS.
    settings_ = telemetry.runtime.settings.model_copy(update={"ingest_gap_wait_seconds": 0.001})
    impatient = IngestWatcher(TelemetryRuntime(settings=settings_, client=telemetry.runtime.client))
    await impatient.drain()
    await asyncio.sleep(0.01)
    await impatient.drain()
    assert await applied_events(telemetry.runtime.db) == 2


async def test_a_leader_whose_client_went_away_still_writes_its_group(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The earliest waiting request leads its group's write; cancelled mid-write (its client
    gone), the write still completes and the other request of its group is answered 202."""
    held = HeldReservations(holds=2)
    monkeypatch.setattr(arrival, "reserve", held)
    blocker = asyncio.create_task(telemetry.post(cli_event("blocker")))
    await held.reached[1].wait()
    leader = asyncio.create_task(telemetry.post(cli_event("leader")))
    await waiting_behind(telemetry, 1)
    follower = asyncio.create_task(telemetry.post(cli_event("follower")))
    await waiting_behind(telemetry, 2)
    held.release[1].set()
    await held.reached[2].wait()  # the leader's group (leader and follower) is being written
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    held.release[2].set()
    assert (await blocker).status_code == 202
    assert (await follower).json() == {"accepted": 1, "duplicates": 0}
    assert held.calls == 2
    await telemetry.drain()
    assert await applied_events(telemetry.runtime.db) == 3


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(
        st.lists(st.integers(min_value=0, max_value=11), min_size=0, max_size=6),
        min_size=1,
        max_size=10,
    )
)
async def test_concurrent_requests_sharing_events_are_answered_and_stored_once_each(
    telemetry: Telemetry, requests: list[list[int]]
) -> None:
    """Requests of ids drawn from a small pool, all at once (groups of any shape, the same
    event in several requests of one group, or twice in one request): every distinct event is
    stored and applied once, each answer adds up to its own request, and the accepted ones add
    up to the distinct events."""
    prefix, device = f"{uuid.uuid4()}-", f"pool-{uuid.uuid4()}"
    answers = await asyncio.gather(
        *(
            telemetry.post({"events": [cli_event(device, event_id=f"{prefix}{n}") for n in ids]})
            for ids in requests
        )
    )
    assert all(a.status_code == 202 for a in answers)
    for ids, answer in zip(requests, answers, strict=True):
        assert answer.json()["accepted"] + answer.json()["duplicates"] == len(ids)
    distinct = {n for ids in requests for n in ids}
    assert sum(a.json()["accepted"] for a in answers) == len(distinct)
    stored = await telemetry.runtime.db[EVENTS].count_documents({"_id": {"$regex": f"^{prefix}"}})
    assert stored == len(distinct)
    await telemetry.drain()
    if distinct:
        device_stats = (await telemetry.device(device)).json()
        assert device_stats["anonymous"]["invocations"] == len(distinct)
