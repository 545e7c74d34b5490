"""The watcher: exactly once (I2) through crashes and replicas; I4 at rest."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from shared_contracts import failpoints, mongo
from shared_contracts.messages import ApiKeyIssued, ApiKeyRevoked
from telemetry_service.collections import (
    EVENTS,
    EVENTS_ASIDE,
    IDENTITY_MAP,
    KNOWN_KEYS,
    KNOWN_USERS,
    USERNAME_METRICS,
)
from telemetry_service.processing import progress as main_line
from telemetry_service.processing import watcher as watcher_module
from telemetry_service.processing.watcher import IngestWatcher, StoredEvent
from telemetry_service.projection.verify import find_drift, verify
from tests.support import expire_watcher_leases, put_aside, unapplied_events
from tests.telemetry.conftest import Telemetry, cli_event


@pytest.fixture(autouse=True)
def no_failpoints() -> Iterator[None]:
    yield
    failpoints.disarm()


async def unprocessed(telemetry: Telemetry) -> int:
    return await unapplied_events(telemetry.runtime.db)


@pytest.mark.parametrize(
    "failpoint",
    [
        watcher_module.AFTER_METRICS_WRITE,
        watcher_module.BEFORE_MARK_PROCESSED,
        watcher_module.BEFORE_COMMIT,
    ],
)
async def test_a_crash_at_any_step_counts_every_event_exactly_once(
    telemetry: Telemetry, failpoint: str
) -> None:
    _, key = await telemetry.register("kate")
    await telemetry.post({"events": [cli_event("k1") for _ in range(5)]}, key)
    await telemetry.post({"events": [cli_event("k2") for _ in range(3)]})
    failpoints.arm(failpoint, times=1)
    with pytest.raises(failpoints.FailpointError):
        await telemetry.watcher.process_one_batch()
    assert await unprocessed(telemetry) == 8  # the transaction rolled everything back
    assert (await telemetry.stats("kate"))["totalInvocations"] == 0
    # The crashed worker's lease expires; a fresh worker takes the batch over.
    await expire_watcher_leases(telemetry.runtime.db)
    await IngestWatcher(telemetry.runtime).drain()
    assert (await telemetry.stats("kate"))["totalInvocations"] == 5
    assert await find_drift(telemetry.runtime.db) == []


async def test_a_worker_that_lost_its_lease_cannot_commit(telemetry: Telemetry) -> None:
    _, key = await telemetry.register("liam")
    await telemetry.post({"events": [cli_event("l1") for _ in range(4)]}, key)
    db = telemetry.runtime.db
    slow = IngestWatcher(telemetry.runtime, worker="slow")
    read = await main_line.lease(db, owner="slow", seconds=60)
    assert read is not None
    documents = await main_line.above_mark(db, read, limit=500)
    step = main_line.step(read, documents, hole_ready=lambda *_: "old", now=datetime.now(UTC))
    # Its lease expires; another worker takes the main line and applies the same events.
    await expire_watcher_leases(db)
    await IngestWatcher(telemetry.runtime).drain()
    batch = [StoredEvent.from_document(d) for d in step.take]
    finish = slow._advance(read, step.to)
    with pytest.raises(watcher_module.LeaseLost):
        async with telemetry.runtime.client.start_session() as session:
            await session.with_transaction(
                lambda s: slow.apply_batch(s, batch, finish=finish, claim=None)
            )
    assert (await telemetry.stats("liam"))["totalInvocations"] == 4


async def test_a_worker_that_lost_its_claim_on_events_aside_cannot_commit(
    telemetry: Telemetry,
) -> None:
    _, key = await telemetry.register("lily")
    await telemetry.post({"events": [cli_event("l2") for _ in range(4)]}, key)
    db = telemetry.runtime.db
    await put_aside(db, {})
    slow = IngestWatcher(telemetry.runtime)
    token, documents = await slow.claim_batch()
    await expire_watcher_leases(db)
    await IngestWatcher(telemetry.runtime).drain()
    batch = [StoredEvent.from_document(d) for d in documents]
    finish = slow._mark_processed(token, whole=True)
    with pytest.raises(watcher_module.LeaseLost):
        async with telemetry.runtime.client.start_session() as session:
            await session.with_transaction(
                lambda s: slow.apply_batch(s, batch, finish=finish, claim=token)
            )
    assert (await telemetry.stats("lily"))["totalInvocations"] == 4


async def test_three_watcher_replicas_process_5000_events_once(telemetry: Telemetry) -> None:
    keys = [(await telemetry.register(f"user-{i}"))[1] for i in range(5)]
    for start in range(0, 5000, 1000):
        events = [
            (cli_event(f"dev-{n % 25}", status="success" if n % 3 else "error"), n)
            for n in range(start, start + 1000)
        ]
        # Devices 0-4 belong to a user each (authenticated); the rest stay anonymous.
        for user in range(5):
            mine = [e for e, n in events if n % 25 == user]
            await telemetry.post({"events": mine}, keys[user])
        await telemetry.post({"events": [e for e, n in events if n % 25 >= 5]})
    assert await telemetry.runtime.db[EVENTS].count_documents({}) == 5000
    replicas = [IngestWatcher(telemetry.runtime, worker=f"r{i}") for i in range(3)]
    await asyncio.gather(*(replica.drain() for replica in replicas))
    assert await unprocessed(telemetry) == 0
    totals = [(await telemetry.stats(f"user-{i}"))["totalInvocations"] for i in range(5)]
    assert totals == [200] * 5
    assert await find_drift(telemetry.runtime.db) == []


async def test_verify_reports_a_tampered_projection(telemetry: Telemetry) -> None:
    mona, key = await telemetry.register("mona")
    await telemetry.post(cli_event("m1"), key)
    await telemetry.drain()
    assert await find_drift(telemetry.runtime.db) == []
    await telemetry.runtime.db[USERNAME_METRICS].update_one(
        {"_id": mona}, {"$set": {"totalInvocations": 99}}
    )
    await telemetry.runtime.db[USERNAME_METRICS].insert_one({"_id": "ghost", "totalInvocations": 1})
    drift = {d.user_id: d for d in await find_drift(telemetry.runtime.db)}
    assert drift[mona].fields == ("totalInvocations",)
    assert drift["ghost"].problem == "projection without an identity entry"


async def test_verify_reports_names_that_disagree_and_devices_missing_from_an_entry(
    telemetry: Telemetry,
) -> None:
    nina, key = await telemetry.register("nina")
    await telemetry.post({"events": [cli_event("n1"), cli_event("n2")]}, key)
    await telemetry.drain()
    db = telemetry.runtime.db
    await db[KNOWN_USERS].update_one({"_id": nina}, {"$set": {"username": "nina-x"}})
    await db[IDENTITY_MAP].update_one({"_id": nina}, {"$pull": {"distinctIds": "n2"}})
    problems = {d.problem for d in await find_drift(db) if d.user_id == nina}
    assert "names disagree (identity, known_users, projection)" in problems
    assert "devices with its buckets missing from its entry" in problems


async def test_verify_lists_set_aside_and_unattributed_events_and_dead_messages(
    telemetry: Telemetry,
) -> None:
    runtime = telemetry.runtime
    report = await verify(runtime.db, runtime.bus)
    assert report.clean
    await runtime.db[EVENTS_ASIDE].insert_one({"_id": "e1", "dead": True, "processed": False})
    await runtime.db[EVENTS].insert_many(
        [{"_id": "e2", "unattributed": "revoked"}, {"_id": "e3", "processed": False}]
    )
    await runtime.commands.publish(ApiKeyRevoked(keyHash="cd" * 32))
    await mongo.update_many(runtime.commands.collection, {}, {"$set": {"status": "dead"}})
    report = await verify(runtime.db, runtime.bus)
    assert not report.clean
    assert report.as_dict() == {
        "clean": False,
        "drift": [],
        "setAsideEvents": 1,
        "notAdoptedEvents": 1,
        "unattributedEvents": {"revoked": 1},
        "deadMessages": {"telemetry_commands": 1, "swamp_club_events": 0},
    }


async def test_a_revoke_that_overtakes_its_issue_keeps_the_key_revoked(
    telemetry: Telemetry,
) -> None:
    digest = "ab" * 32
    await telemetry.runtime.commands.publish(ApiKeyRevoked(keyHash=digest))
    await telemetry.drain()
    await telemetry.runtime.commands.publish(ApiKeyIssued(userId="u1", keyHash=digest))
    await telemetry.drain()
    known = await telemetry.runtime.db[KNOWN_KEYS].find_one({"_id": digest})
    assert known["revokedAt"] is not None
    assert known["userId"] == "u1"


async def test_events_that_keep_failing_are_set_aside_not_lost(telemetry: Telemetry) -> None:
    _, key = await telemetry.register("pete")
    await telemetry.post({"events": [cli_event("p1"), cli_event("p1")]}, key)
    db = telemetry.runtime.db
    poison = (await db[EVENTS].find_one({}))["_id"]
    limit = telemetry.runtime.settings.queue_max_attempts
    # Aside, claimed `limit` times already (its workers kept dying).
    await put_aside(db, {"_id": poison}, attempts=limit)
    await telemetry.drain()
    kept = await db[EVENTS_ASIDE].find_one({"_id": poison})
    assert (kept["processed"], kept["dead"]) == (False, True)  # kept for an operator, not counted
    assert (await telemetry.stats("pete"))["totalInvocations"] == 1
    assert await telemetry.watcher.process_one_batch() == 0  # never claimed again


async def test_the_app_claiming_a_pending_refresh_mid_batch_does_not_rerun_the_batch(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch ends by coalescing the user's new refresh into the pending one. The app claims
    that pending refresh while the batch's transaction is open: before the batch held it
    (Queue.hold_pending), the claim committed, the publish met a write conflict and the whole
    batch ran again. Now the claim meets the hold, leaves that refresh (it does not wait for
    the batch either: Queue.held_elsewhere), and the next claim gets the newest projection."""
    user_id, key = await telemetry.register("holder")
    await telemetry.post({"events": [cli_event("hold-dev")]}, key)
    await telemetry.watcher.drain()  # a pending refresh for the user
    await telemetry.post({"events": [cli_event("hold-dev") for _ in range(3)]}, key)
    real, applies = watcher_module.apply_events, 0
    claim: asyncio.Task[Any] | None = None

    async def apply_events(db: Any, events: Any, **kwargs: Any) -> Any:
        nonlocal applies, claim
        applies += 1
        if claim is None:  # the app claims while this batch's transaction is open
            claim = asyncio.create_task(
                telemetry.runtime.refreshes.claim_many(worker="app", limit=10)
            )
            await asyncio.sleep(0.3)
        return await real(db, events, **kwargs)

    monkeypatch.setattr(watcher_module, "apply_events", apply_events)
    assert await telemetry.watcher.process_one_batch() == 3
    assert applies == 1, "the batch ran again after a write conflict"
    assert claim is not None
    assert await claim == []  # the refresh was held: left for later
    (claimed,) = await telemetry.runtime.refreshes.claim_many(worker="app", limit=10)
    assert claimed.document["userId"] == user_id
    projection = await telemetry.runtime.db[USERNAME_METRICS].find_one({"_id": user_id})
    assert projection is not None
    # The batch's projection, not the one before it.
    assert claimed.document["projectionVersion"] == projection["projectionVersion"]
    assert claimed.document["snapshot"]["totalInvocations"] == 4
