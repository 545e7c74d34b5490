"""Arrival order (I3, I11): the watcher claims events in the order the server stored them, and a
device's owner is the user whose authenticated event arrived first, never decided by the
client's event id or clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from telemetry_service.collections import EVENTS, UNCLAIMED
from telemetry_service.ingest.arrival import number_unsequenced
from telemetry_service.processing.aside import adopt_older_release
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from tests.support import applied_event_ids, unapplied_events
from tests.telemetry.conftest import Telemetry, cli_event


def one_at_a_time(runtime: TelemetryRuntime) -> IngestWatcher:
    settings = runtime.settings.model_copy(
        update={"ingest_batch_size": 1, "ingest_max_batch_size": 1}
    )
    return IngestWatcher(TelemetryRuntime(settings=settings, client=runtime.client))


async def test_claims_follow_arrival_not_the_clients_event_id(telemetry: Telemetry) -> None:
    ids = ["ffff-late-id", "0000-early-id", "8888-middle-id"]  # arrival order, ids unsorted
    for event_id in ids:
        await telemetry.post(cli_event("dev", event_id=event_id))
    watcher = one_at_a_time(telemetry.runtime)
    applied = []
    for _ in ids:
        await watcher.process_one_batch()
        done = await applied_event_ids(telemetry.runtime.db)
        applied.append(next(e for e in done if e not in applied))
    assert applied == ids


async def test_the_first_authenticated_arrival_owns_the_device_whatever_its_clock(
    telemetry: Telemetry,
) -> None:
    first, first_key = await telemetry.register("first")
    _, second_key = await telemetry.register("second")
    # One batch: "first" arrives first but claims a later start; "second" back-dates itself
    # (within the window in which the server believes a client's clock).
    now = datetime.now(UTC)
    later, earlier = (
        (now - timedelta(hours=h)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for h in (1, 48)
    )
    await telemetry.post(cli_event("shared", started_at=later), first_key)
    await telemetry.post(cli_event("shared", started_at=earlier), second_key)
    await telemetry.post(cli_event("shared"))  # anonymous
    await telemetry.drain()
    device = (await telemetry.device("shared")).json()
    assert device["ownerUserId"] == first
    assert (await telemetry.stats("first"))["totalInvocations"] == 2
    assert (await telemetry.stats("second"))["totalInvocations"] == 1


async def test_events_stored_before_the_sequence_are_numbered_first_in_receipt_order(
    telemetry: Telemetry,
) -> None:
    await telemetry.post(cli_event("new-dev"))
    events = telemetry.runtime.db[EVENTS]
    (new,) = await events.find().to_list()
    old = [
        {
            **new,
            "_id": f"old-{i}",
            "receivedAt": new["receivedAt"].replace(year=2025, month=i),
            "processed": False,
            "leaseUntil": UNCLAIMED,
        }
        for i in (3, 1, 2)
    ]
    for document in old:
        document.pop("seq")
    await events.insert_many(old)
    assert await number_unsequenced(telemetry.runtime.db) == 3
    assert await number_unsequenced(telemetry.runtime.db) == 0  # idempotent
    numbered = await events.find({}, sort=[("seq", 1)]).to_list()
    assert [e["_id"] for e in numbered] == ["old-1", "old-2", "old-3", new["_id"]]
    assert await adopt_older_release(telemetry.runtime.db, look=True) == 3  # a worker's start
    await telemetry.drain()
    assert await unapplied_events(telemetry.runtime.db) == 0
