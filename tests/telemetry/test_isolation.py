"""One bad event never hurts another (SPEC I11): a failing batch is split until the failing
events are alone; only they wait for a retry or are set aside, with their reason, and the rest
are applied in the same pass. Attempts count per event; the lease is renewed while a batch runs.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pymongo.errors import OperationFailure

from shared_contracts import mongo
from telemetry_service.collections import EVENTS, EVENTS_ASIDE, USER_METRICS
from telemetry_service.processing import watcher as watcher_module
from telemetry_service.processing.set_aside import (
    count_set_aside,
    list_set_aside,
    purge_set_aside,
    retry_set_aside,
)
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from tests.support import kept_aside_by_an_older_release, stuck_events
from tests.telemetry.conftest import Telemetry, cli_event
from tests.telemetry.test_ingest_bounds import hostile_event, overrides


def splits() -> float:
    return REGISTRY.get_sample_value("swamp_ingest_batches_total", {"outcome": "split"}) or 0.0


async def store_as_an_older_release_did(telemetry: Telemetry, event: dict[str, Any]) -> None:
    """An event accepted under older, looser rules: today's validation refuses to read it."""
    document = {
        "_id": event["insert_id"],
        "raw": event,
        "distinctId": event["distinct_id"],
        "keyHash": None,
        "receivedAt": datetime.now(UTC),
        "processed": False,
        "leaseUntil": datetime(1970, 1, 1, tzinfo=UTC),
        "seq": 0,
    }
    await kept_aside_by_an_older_release(telemetry.runtime.db, [document])


async def test_an_unreadable_event_is_set_aside_at_once_and_its_batch_applied(
    telemetry: Telemetry,
) -> None:
    _, key = await telemetry.register("victim")
    poison = cli_event("victim-dev")
    poison["properties"]["startedAt"] = "9999-12-31T23:00:00-05:00"  # year 10000 in UTC
    await store_as_an_older_release_did(telemetry, poison)
    for _ in range(2):
        await telemetry.post({"events": [cli_event("victim-dev") for _ in range(25)]}, key)
    await telemetry.drain()
    assert (await telemetry.stats("victim"))["totalInvocations"] == 50
    (aside,) = await list_set_aside(telemetry.runtime.db)
    assert aside["id"] == poison["insert_id"]
    assert aside["lastError"].startswith("unreadable: ValidationError")


async def test_events_that_fail_inside_the_transaction_are_isolated_by_splitting(
    telemetry: Telemetry,
) -> None:
    """A device document an old bug left malformed: every update of it fails. Its events fail
    alone and are retried, then set aside; the other 40 events of the batch are applied in the
    first pass."""
    _, key = await telemetry.register("bystander")
    await telemetry.runtime.db[USER_METRICS].insert_one({"_id": "broken-dev", "anon": "garbage"})
    mixed = [cli_event("good-dev") for _ in range(20)]
    mixed += [cli_event("broken-dev"), cli_event("broken-dev")]
    mixed += [cli_event("good-dev") for _ in range(20)]
    before = splits()
    await telemetry.post({"events": mixed}, key)
    tried_from = datetime.now(UTC)
    assert await telemetry.watcher.process_one_batch() == 42
    assert (await telemetry.stats("bystander"))["totalInvocations"] == 40
    assert splits() > before
    events = telemetry.runtime.db[EVENTS_ASIDE]
    failing = await events.find({"processed": False}).to_list()
    assert [e["distinctId"] for e in failing] == ["broken-dev", "broken-dev"]
    assert all(e["lastError"] for e in failing)  # why, for the operator
    # Backing off: retried no earlier than a backoff after they failed. (Measured from before
    # the batch, not from now: on a loaded machine the 1 s backoff may have passed already.)
    backoff = timedelta(seconds=telemetry.runtime.settings.queue_backoff_base_seconds)
    stored_precision = timedelta(milliseconds=1)  # BSON dates are whole milliseconds
    assert all(e["leaseUntil"] >= tried_from + backoff - stored_precision for e in failing)

    limit = telemetry.runtime.settings.queue_max_attempts
    for _ in range(limit):  # let the backoffs pass, attempt after attempt
        await mongo.update_many(
            events,
            {"processed": False, "dead": {"$ne": True}},
            {"$set": {"leaseUntil": datetime.now(UTC)}},
        )
        await telemetry.watcher.drain()
    assert await count_set_aside(telemetry.runtime.db) == 2
    assert (await telemetry.stats("bystander"))["totalInvocations"] == 40

    # The operator repairs the device and retries: they are counted, once.
    await telemetry.runtime.db[USER_METRICS].delete_one({"_id": "broken-dev"})
    assert await retry_set_aside(telemetry.runtime.db, ids=None) == 2
    await telemetry.drain()
    assert (await telemetry.stats("bystander"))["totalInvocations"] == 42
    assert await count_set_aside(telemetry.runtime.db) == 0


async def test_purging_deletes_only_set_aside_events(telemetry: Telemetry) -> None:
    poison = cli_event("p-dev")
    poison["properties"]["startedAt"] = "0001-01-01T00:30:00+05:00"
    await store_as_an_older_release_did(telemetry, poison)
    await telemetry.post(cli_event("p-dev"))
    await telemetry.drain()
    db = telemetry.runtime.db
    assert await purge_set_aside(db, ids=["not-set-aside", poison["insert_id"]]) == 1
    assert await db[EVENTS].count_documents({}) == 1  # the stored event went with its copy
    assert await db[EVENTS_ASIDE].count_documents({"_id": poison["insert_id"]}) == 0


async def test_the_lease_is_renewed_before_each_transaction_attempt(
    telemetry: Telemetry, monkeypatch: Any
) -> None:
    """Two slow attempts (a write conflict between them) take longer than the lease in total;
    a rival replica still cannot take the batch, because each attempt renews it first."""
    settings_ = telemetry.runtime.settings.model_copy(update={"ingest_lease_seconds": 0.5})
    runtime = TelemetryRuntime(settings=settings_, client=telemetry.runtime.client)
    slow, rival = IngestWatcher(runtime), IngestWatcher(runtime)
    await telemetry.post({"events": [cli_event("slow-dev") for _ in range(3)]})
    real = watcher_module.apply_events
    rival_took: list[int] = []

    async def slow_apply(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.35)
        rival_took.append(len((await rival.claim_batch())[1]))
        if len(rival_took) == 1:
            conflict = OperationFailure("write conflict", code=112)
            conflict._add_error_label("TransientTransactionError")
            raise conflict  # with_transaction runs the batch again
        return await real(*args, **kwargs)

    monkeypatch.setattr(watcher_module, "apply_events", slow_apply)
    assert await slow.process_one_batch() == 3
    assert rival_took == [0, 0]
    device = (await telemetry.device("slow-dev")).json()
    assert device["anonymous"]["invocations"] == 3


# --- the property: anything /ingest accepts is counted or set aside, nothing is stuck ---------


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(overrides, min_size=1, max_size=6), valid=st.integers(1, 5))
async def test_random_extremes_mixed_with_valid_events_are_all_counted_or_set_aside(
    telemetry: Telemetry, changes: list[dict[str, Any]], valid: int
) -> None:
    db = telemetry.runtime.db
    await mongo.delete_many(db[EVENTS], {})  # hypothesis reuses the fixture across examples
    await mongo.delete_many(db[EVENTS_ASIDE], {})
    user_id, key = await telemetry.register(f"mixer-{await db[EVENTS].estimated_document_count()}")
    hostile = [hostile_event(c) for c in changes]
    for event in hostile:
        event["distinct_id"] = "mixed-dev"
    good = [cli_event("mixed-dev") for _ in range(valid)]
    accepted = list(good)
    for event in hostile:  # one request each: a refused one does not take the others with it
        response = await telemetry.post(copy.deepcopy(event), key)
        assert response.status_code in (202, 422), response.text
        if response.status_code == 202:
            accepted.append(event)
    await telemetry.post({"events": good} if valid > 1 else good[0], key)
    received = datetime.now(UTC)
    await telemetry.drain()

    stored = await db[EVENTS].find().to_list()
    assert len(stored) == len(accepted)
    assert await stuck_events(db) == []
    aside = await db[EVENTS_ASIDE].find({"dead": True}).to_list()
    assert all(e["lastError"] for e in aside)
    assert not {e["_id"] for e in aside} & {g["insert_id"] for g in good}
    device = (await telemetry.device("mixed-dev")).json()
    bucket = device["users"][user_id]
    assert bucket["invocations"] == len(stored) - len(aside)
    window = {
        (received + timedelta(days=d)).date().isoformat() for d in range(-9, 1)
    }  # receivedAt - 8 days .. receivedAt + 5 minutes, as UTC days (with a day of slack)
    assert set(bucket["activeDays"]) <= window


async def test_ten_thousand_invented_command_names_leave_every_document_bounded(
    telemetry: Telemetry,
) -> None:
    """Command keys come from the CLI's vocabulary, so invented names cannot grow a bucket, a
    projection or a refresh snapshot: they all count under one key."""
    _, key = await telemetry.register("inventor")
    for start in range(0, 10_000, 1000):
        events = [cli_event("inv-dev", command=f"cmd-{n}") for n in range(start, start + 1000)]
        response = await telemetry.post({"events": events}, key)
        assert response.status_code == 202, response.text
    await telemetry.watcher.drain()  # batches of up to INGEST_MAX_BATCH_SIZE (5,000)
    stats = await telemetry.stats("inventor")
    assert stats["totalInvocations"] == 10_000
    assert stats["commandCounts"] == {"other": 10_000}
    device = (await telemetry.device("inv-dev")).json()
    assert len(next(iter(device["users"].values()))["commandCounts"]) == 1
