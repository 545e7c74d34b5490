"""Attacks on the isolating ingest watcher (SPEC I2, I3, I11, I12): poison in every position of
big batches, poison that fails only in some attempts, rival replicas with short leases, leases
lost and crashes in the middle of a split, operators retrying and purging while a watcher runs,
hostile stats requests and hostile admin/CLI input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pymongo.errors import ExecutionTimeout

from shared_contracts import failpoints, mongo
from shared_contracts.keys import api_key_hash as key_hash
from shared_contracts.messages import ApiKeyIssued, ApiKeyRevoked, UserRegistered
from telemetry_service.collections import EVENTS, EVENTS_ASIDE, UNCLAIMED, USER_METRICS
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.ingest import arrival
from telemetry_service.processing import watcher as watcher_module
from telemetry_service.processing.set_aside import count_set_aside, purge_set_aside, retry_set_aside
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from tests.support import (
    DbNames,
    applied_events,
    expire_watcher_leases,
    swamp_club_cli,
    unapplied_events,
)
from tests.telemetry.conftest import ADMIN, ADMIN_TOKEN, Telemetry, another_replica, cli_event
from tests.telemetry.test_isolation import store_as_an_older_release_did


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoints.disarm()


def replica(telemetry: Telemetry, **settings: Any) -> IngestWatcher:
    """A watcher with its own settings (batch size, lease, attempts...)."""
    changed = telemetry.runtime.settings.model_copy(update=settings)
    runtime = TelemetryRuntime(settings=changed, client=telemetry.runtime.client)
    return IngestWatcher(runtime, worker=f"w-{uuid.uuid4().hex[:4]}")


class Poison:
    """Events that fail inside the transaction (as an event the database refuses would): always,
    or only in their first ``flaky`` transaction attempts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.always: set[str] = set()
        self.flaky: dict[str, int] = {}
        real = watcher_module.apply_events

        async def apply_events(db: Any, events: Any, **kwargs: Any) -> Any:
            ids = {e.id for e in events}
            if ids & self.always:
                raise ValueError(f"poison {sorted(ids & self.always)}")
            for event_id in sorted(ids & set(self.flaky)):
                if self.flaky[event_id] > 0:
                    self.flaky[event_id] -= 1
                    raise ValueError(f"flaky poison {event_id}")
            return await real(db, events, **kwargs)

        monkeypatch.setattr(watcher_module, "apply_events", apply_events)


def batches(outcome: str) -> float:
    value = REGISTRY.get_sample_value("swamp_ingest_batches_total", {"outcome": outcome})
    return value or 0.0


async def expire_backoffs(telemetry: Telemetry) -> None:
    await expire_watcher_leases(telemetry.runtime.db)


async def counted(telemetry: Telemetry) -> int:
    """Sum of every bucket's invocations over all devices."""
    total = 0
    async for device in telemetry.runtime.db[USER_METRICS].find():
        total += int(device.get("anon", {}).get("invocations", 0))
        total += sum(int(b.get("invocations", 0)) for b in device.get("users", {}).values())
    return total


async def learn_key(telemetry: Telemetry, username: str, key: str) -> str:
    """The app's commands for a user whose key was already in use reach telemetry now."""
    user_id = uuid.uuid4().hex
    await telemetry.runtime.commands.publish(
        UserRegistered(userId=user_id, username=username, seq=telemetry.tick())
    )
    await telemetry.runtime.commands.publish(ApiKeyIssued(userId=user_id, keyHash=key_hash(key)))
    await command_consumer(telemetry.runtime).drain()
    return user_id


async def owner_of(telemetry: Telemetry, device: str) -> str | None:
    document = await telemetry.runtime.db[USER_METRICS].find_one({"_id": device})
    return None if document is None else document.get("ownerUserId")


# --- I3: ownership follows arrival, also across batch boundaries and splits -----------------


async def test_a_waiting_key_in_an_earlier_batch_still_owns_the_device(
    telemetry: Telemetry,
) -> None:
    """BUG: behind_a_waiting_key only looks inside one batch. Alice's event (key not known yet)
    arrives first on a new device, Bob's (known key) second; with batches of 1 Alice's event is
    deferred in batch 1 and Bob's applied in batch 2: Bob owns the device, though Alice's
    authenticated event reached the server first (I3)."""
    bob, bob_key = await telemetry.register("bobby")
    alice_key = f"swamp_{uuid.uuid4().hex}"  # the app just returned it: telemetry does not know it
    assert (await telemetry.post(cli_event("shared"), alice_key)).status_code == 202
    async with another_replica(telemetry) as other:
        assert (await other.post(cli_event("shared"), bob_key)).status_code == 202

    await replica(telemetry, ingest_batch_size=1, ingest_max_batch_size=1).drain()
    # The app's user_registered and api_key_issued for alice reach telemetry now.
    alice = await learn_key(telemetry, "alice", alice_key)
    await expire_backoffs(telemetry)
    await telemetry.watcher.drain()
    assert await unapplied_events(telemetry.runtime.db) == 0
    assert await owner_of(telemetry, "shared") == alice, f"bob ({bob}) took the device"


async def test_a_split_separating_a_waiting_key_from_a_later_user_keeps_arrival_ownership(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BUG, the same hole with the default batch size: one poison event anywhere in the batch
    splits it, the halves are separate transactions, and the half holding Bob's event no longer
    sees Alice's waiting event in the other half: Bob owns the device Alice reached first."""
    poison = Poison(monkeypatch)
    bob, bob_key = await telemetry.register("bobby")
    alice_key = f"swamp_{uuid.uuid4().hex}"
    assert (await telemetry.post(cli_event("shared"), alice_key)).status_code == 202
    bad = cli_event("elsewhere")
    poison.always.add(bad["insert_id"])
    await telemetry.post(bad)
    async with another_replica(telemetry) as other:
        assert (await other.post(cli_event("shared"), bob_key)).status_code == 202

    await telemetry.watcher.drain()  # [alice's | poison, bob's] -> [alice's] [poison] [bob's]
    alice = await learn_key(telemetry, "alice", alice_key)
    poison.always.clear()
    await expire_backoffs(telemetry)
    await telemetry.watcher.drain()
    assert await unapplied_events(telemetry.runtime.db) == 0
    assert await owner_of(telemetry, "shared") == alice, f"bob ({bob}) took the device"


async def test_a_failing_first_authenticated_event_does_not_hold_the_device_for_itself(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DECIDED (found as a conflict between I3 and I11). Alice's authenticated event reached
    the server first but fails on its own; Bob's later one is in the same batch. Holding Bob's
    behind Alice's until its retry succeeds could delay it by Alice's whole backoff, up to her
    event being set aside: more than one lease, which I11 forbids. So a failing event never
    holds others back, and the device goes to the first authenticated event that is applied.
    (A key that is merely not known yet does hold them: see the waiting-key tests.)"""
    poison = Poison(monkeypatch)
    alice, alice_key = await telemetry.register("alice")
    bob, bob_key = await telemetry.register("bobby")
    first = cli_event("shared")
    # The main line's batch, that batch again aside, then its own attempt once split off.
    poison.flaky[first["insert_id"]] = 3
    await telemetry.post(first, alice_key)
    await telemetry.post(cli_event("shared"), bob_key)
    await telemetry.watcher.drain()
    assert await owner_of(telemetry, "shared") == bob  # not held behind the failing event
    await expire_backoffs(telemetry)
    await telemetry.watcher.drain()
    assert await applied_events(telemetry.runtime.db) == 2
    assert await owner_of(telemetry, "shared") == bob, f"alice ({alice}) moved the device"
    assert (await telemetry.stats("alice"))["totalInvocations"] == 1  # her own, counted once


async def test_an_event_stored_without_an_arrival_number_does_not_stop_the_watcher(
    telemetry: Telemetry,
) -> None:
    """BUG: during a rolling upgrade an older replica still stores events without ``seq``
    (number_unsequenced runs once, at start-up). The claim sorts them first and reads
    ``d["seq"]``: KeyError on every batch, and nothing at all is applied any more (I11)."""
    old = cli_event("old-replica-dev")
    await telemetry.runtime.db[EVENTS].insert_one(
        {
            "_id": old["insert_id"],
            "raw": old,
            "distinctId": old["distinct_id"],
            "keyHash": None,
            "receivedAt": datetime.now(UTC),
            "processed": False,
            "leaseUntil": UNCLAIMED,
        }
    )
    await telemetry.post({"events": [cli_event("new-dev") for _ in range(3)]})
    await telemetry.watcher.drain()
    assert (await telemetry.device("new-dev")).json()["anonymous"]["invocations"] == 3


# --- I11 + I2: poison anywhere, exactly once ------------------------------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(size=st.integers(2, 60), data=st.data())
async def test_poison_anywhere_in_a_big_batch_leaves_every_other_event_applied_in_one_pass(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, size: int, data: st.DataObject
) -> None:
    """First, last, many, all: one pass applies every innocent event, exactly once; only the
    poison waits, each with its reason and a backoff."""
    db = telemetry.runtime.db
    await mongo.delete_many(db[EVENTS], {})
    await mongo.delete_many(db[EVENTS_ASIDE], {})
    await mongo.delete_many(db[USER_METRICS], {})
    bad = data.draw(st.sets(st.integers(0, size - 1), min_size=1), label="poison positions")
    poison = Poison(monkeypatch)
    events = [cli_event(f"dev-{i % 4}") for i in range(size)]
    poison.always = {events[i]["insert_id"] for i in bad}
    assert (await telemetry.post({"events": events})).status_code == 202
    assert await telemetry.watcher.process_one_batch() == size
    assert await counted(telemetry) == size - len(bad)
    left = await db[EVENTS_ASIDE].find({"processed": False}).to_list()
    assert {e["_id"] for e in left} == poison.always
    assert all(e["lastError"].startswith("ValueError: poison") for e in left)
    assert all("claimToken" not in e and e["attempts"] == 1 for e in left)
    assert await applied_events(db) == size - len(bad)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    layout=st.lists(st.sampled_from(["good", "good", "auth", "poison", "flaky"]), max_size=40),
    batch=st.integers(1, 12),
    lease=st.sampled_from([0.3, 1.0, 30.0]),
)
async def test_two_replicas_over_a_mixed_backlog_with_poison_count_each_event_once(
    telemetry: Telemetry,
    monkeypatch: pytest.MonkeyPatch,
    layout: list[str],
    batch: int,
    lease: float,
) -> None:
    db = telemetry.runtime.db
    await mongo.delete_many(db[EVENTS], {})
    await mongo.delete_many(db[EVENTS_ASIDE], {})
    await mongo.delete_many(db[USER_METRICS], {})
    _, key = await telemetry.register(f"mix-{uuid.uuid4().hex[:8]}")
    poison = Poison(monkeypatch)
    anonymous: list[dict[str, Any]] = []
    authenticated: list[dict[str, Any]] = []
    for n, kind in enumerate(layout):
        event = cli_event(f"dev-{n % 3}")
        (authenticated if kind == "auth" else anonymous).append(event)
        if kind == "poison":
            poison.always.add(event["insert_id"])
        elif kind == "flaky":
            poison.flaky[event["insert_id"]] = 2
    for chunk in (
        anonymous[: len(anonymous) // 2],
        authenticated,
        anonymous[len(anonymous) // 2 :],
    ):
        if chunk:
            assert (
                await telemetry.post({"events": chunk}, key if chunk is authenticated else None)
            ).status_code == 202

    settings_ = {
        "ingest_batch_size": batch,
        "ingest_max_batch_size": batch,
        "ingest_lease_seconds": lease,
        "queue_max_attempts": 3,
    }
    rivals = [replica(telemetry, **settings_), replica(telemetry, **settings_)]
    for _ in range(5):
        await asyncio.gather(*(r.drain() for r in rivals))
        await expire_backoffs(telemetry)

    processed = await applied_events(db)
    assert await counted(telemetry) == processed  # I2
    assert await db[EVENTS_ASIDE].count_documents({"processed": True, "dead": True}) == 0
    dead = {e["_id"] for e in await db[EVENTS_ASIDE].find({"dead": True}).to_list()}
    assert dead == poison.always
    assert processed == len(layout) - len(poison.always)


@pytest.mark.parametrize("skip", [0, 1, 2])
@pytest.mark.parametrize(
    "failpoint",
    [
        watcher_module.AFTER_METRICS_WRITE,
        watcher_module.BEFORE_MARK_PROCESSED,
        watcher_module.BEFORE_COMMIT,
    ],
)
async def test_a_crash_in_the_middle_of_a_split_counts_every_event_once(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, failpoint: str, skip: int
) -> None:
    """The whole batch fails on a poison event; ``skip`` parts of the split commit, then the
    worker dies inside the next part. A fresh worker takes over after the lease."""
    poison = Poison(monkeypatch)
    _, key = await telemetry.register("crashy")
    events = [cli_event(f"c-{i % 3}") for i in range(12)]
    poison.always = {events[4]["insert_id"], events[9]["insert_id"]}
    await telemetry.post({"events": events}, key)
    failpoints.arm(failpoint, times=1, skip=skip)
    with pytest.raises(failpoints.FailpointError):
        await telemetry.watcher.process_one_batch()
    failpoints.disarm()
    db = telemetry.runtime.db
    for _ in range(telemetry.runtime.settings.queue_max_attempts + 1):
        await expire_backoffs(telemetry)
        await IngestWatcher(telemetry.runtime).drain()
    assert (await telemetry.stats("crashy"))["totalInvocations"] == 10
    assert await counted(telemetry) == await applied_events(db) == 10
    dead = {e["_id"] for e in await db[EVENTS_ASIDE].find({"dead": True}).to_list()}
    assert dead == poison.always


async def test_a_lease_lost_in_the_middle_of_a_split_counts_every_event_once(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first half of a split commits; before the second half runs, a rival replica takes
    the rest of the claim over (our lease expired) and applies it. Our second half must not
    count anything a second time."""
    poison = Poison(monkeypatch)
    _, key = await telemetry.register("leasy")
    events = [cli_event(f"l-{i % 2}") for i in range(8)]
    poison.always = {events[1]["insert_id"]}
    await telemetry.post({"events": events}, key)
    db = telemetry.runtime.db
    rival = IngestWatcher(telemetry.runtime, worker="rival")
    real_renew = IngestWatcher._renew_lease
    renewals = 0

    async def renew_then_lose(self: IngestWatcher, token: str) -> None:
        nonlocal renewals
        renewals += 1
        await real_renew(self, token)
        if self is not rival and renewals == 5:  # whole, [0:4], [0:2], [0:1], [1:2] -> [2:4]
            await mongo.update_many(
                db[EVENTS_ASIDE], {"claimToken": token}, {"$set": {"leaseUntil": UNCLAIMED}}
            )
            await rival.process_one_batch()

    monkeypatch.setattr(IngestWatcher, "_renew_lease", renew_then_lose)
    lost = batches("lease_lost")
    await telemetry.watcher.process_one_batch()
    assert renewals >= 5
    assert batches("lease_lost") == lost + 1  # our second half found the rival's claim
    await expire_backoffs(telemetry)
    await telemetry.watcher.drain()
    assert await counted(telemetry) == await applied_events(db) == 7
    assert (await telemetry.stats("leasy"))["totalInvocations"] == 7


# --- operators: retry and purge while a watcher runs ----------------------------------------


async def test_retry_and_purge_racing_a_running_watcher_never_count_twice_or_lose_an_event(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = Poison(monkeypatch)
    db = telemetry.runtime.db
    _, key = await telemetry.register("racer")
    events = [cli_event(f"r-{i % 3}") for i in range(30)]
    poison.always = {e["insert_id"] for e in events[::3]}  # 10 of 30
    purged_ids = sorted(poison.always)[:4]
    await telemetry.post({"events": events}, key)
    watcher = replica(telemetry, ingest_batch_size=4, ingest_max_batch_size=4, queue_max_attempts=1)

    async def operator() -> None:
        for round_ in range(12):
            await retry_set_aside(db, ids=None)
            if round_ % 3 == 2:
                await purge_set_aside(db, ids=purged_ids)
            await asyncio.sleep(0)

    async def watching() -> None:
        for _ in range(12):
            await watcher.drain()
            await expire_backoffs(telemetry)

    await asyncio.gather(operator(), watching(), watcher.drain())
    await purge_set_aside(db, ids=purged_ids)
    poison.always.clear()  # the operator fixed the cause
    await retry_set_aside(db, ids=None)
    await expire_backoffs(telemetry)
    await watcher.drain()
    processed = await applied_events(db)
    assert await counted(telemetry) == processed
    remaining = {e["_id"] for e in await db[EVENTS].find().to_list()}
    purged = {e["insert_id"] for e in events} - remaining
    assert purged <= set(purged_ids)  # only what the operator purged is gone, never counted
    assert processed == 30 - len(purged)
    assert await unapplied_events(db) == 0


# --- hostile requests ------------------------------------------------------------------------


async def test_hostile_device_stats_requests_learn_nothing(telemetry: Telemetry) -> None:
    _, key = await telemetry.register("owner")
    _, other_key = await telemetry.register("other")
    await telemetry.post(cli_event("laptop"), key)
    await telemetry.drain()
    # The owner's key, revoked since.
    await telemetry.runtime.commands.publish(ApiKeyRevoked(keyHash=key_hash(key)))
    await command_consumer(telemetry.runtime).drain()

    def get(params: dict[str, str], headers: dict[str, Any]) -> Any:
        return telemetry.http.get("/v1/stats", params=params, headers=headers)

    device = {"distinct_id": "laptop"}
    hostile: list[tuple[dict[str, Any], int]] = [
        ({"x-api-key": other_key}, 404),
        ({"x-api-key": key}, 401),  # revoked
        ({"Authorization": f"Bearer {key}"}, 401),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 401),
        ({"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, 401),
        ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
        ({"Authorization": f"Bearer {ADMIN_TOKEN} {ADMIN_TOKEN}"}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Bearer    "}, 401),
        ({"Authorization": "    "}, 401),
        ({"Authorization": "\u00e9\u00e9".encode("latin-1")}, 401),
        ({"x-api-key": ADMIN_TOKEN}, 401),  # the admin token is not an API key
        ({"x-api-key": "   ", "Authorization": "Token abc"}, 401),
    ]
    for headers, status in hostile:
        response = await get(device, headers)
        assert response.status_code == status, (headers, response.text)
        assert "laptop" not in response.text or status == 404
        public = await get({"username": "owner"}, headers)
        assert public.status_code == 200, (headers, public.text)
        assert "distinctIds" not in public.json(), headers
    assert (await get(device, {"Authorization": f"bearer  {ADMIN_TOKEN} "})).status_code == 200
    assert (await get({"username": "owner"}, {"x-api-key": key})).json().get("distinctIds") is None


@pytest.mark.parametrize("path", ["/admin/events/dead/retry", "/admin/events/dead/purge"])
async def test_a_huge_ids_list_on_the_admin_api_is_refused_not_a_500(
    telemetry: Telemetry, path: str
) -> None:
    """BUG: ``EventIds.ids`` allows 10,000 ids of any length and the admin API has no body limit;
    10,000 ids of 2,000 characters make a 20 MB ``$in`` filter, over MongoDB's 16 MB command
    limit: the request fails with a 500 instead of a 413/422."""
    ids = [f"{n:06d}" + "x" * 1994 for n in range(10_000)]
    try:
        response = await telemetry.http.post(path, json={"ids": ids}, headers=ADMIN)
    except Exception as exc:  # the in-process transport re-raises what the app did not handle
        pytest.fail(f"unhandled {type(exc).__name__}: {str(exc)[:200]}")
    assert response.status_code in (400, 413, 422), response.text[:300]


async def test_admin_ids_at_the_limit_and_odd_ids_work(telemetry: Telemetry) -> None:
    odd = ["-x", "--all", " ", "a\nb", "$in", "ü" * 200]
    for event_id in odd:
        event = cli_event("odd-dev", event_id=event_id)
        event["properties"]["startedAt"] = "9999-12-31T23:00:00-05:00"
        await store_as_an_older_release_did(telemetry, event)
    await telemetry.drain()
    assert await count_set_aside(telemetry.runtime.db) == len(odd)
    many = [str(n) for n in range(10_000)] + odd[:2]
    response = await telemetry.http.post(
        "/admin/events/dead/retry", json={"ids": many[-10_000:]}, headers=ADMIN
    )
    assert response.json() == {"retried": 2}
    too_many = await telemetry.http.post(
        "/admin/events/dead/retry", json={"ids": many}, headers=ADMIN
    )
    assert too_many.status_code == 422
    bodies: list[Any] = [{"ids": [1, 2]}, {"ids": "x"}, {"ids": [None]}, [], {"ids": [{"$ne": 1}]}]
    for bad in bodies:
        response = await telemetry.http.post("/admin/events/dead/purge", json=bad, headers=ADMIN)
        assert response.status_code in (400, 422), (bad, response.text)
    assert await count_set_aside(telemetry.runtime.db) == len(odd) - 2


async def test_the_events_command_line_with_odd_ids(
    telemetry: Telemetry, mongo_uri: str, db_names: DbNames
) -> None:
    odd = ["-x", "--all", "a b", "\u00fc\u00df", "$ne"]
    for event_id in odd:
        event = cli_event("odd-dev", event_id=event_id)
        event["properties"]["startedAt"] = "9999-12-31T23:00:00-05:00"
        await store_as_an_older_release_did(telemetry, event)
    await telemetry.drain()

    async def swamp_club(*args: str) -> tuple[int, str]:
        code, output = await swamp_club_cli(mongo_uri, db_names, "events", *args)
        return code, output

    code, output = await swamp_club("dead", "--json")
    assert code == 0, output
    assert {e["id"] for e in json.loads(output)["events"]} == set(odd)
    assert await swamp_club("retry", "--json", "--", "-x", "--all") == (0, '{"retried": 2}\n')
    assert await swamp_club("purge", "--json", "--", "a b", "$ne", "$ne") == (0, '{"purged": 2}\n')
    code, output = await swamp_club("retry", "--json", "--all", "--", "\u00fc\u00df")
    assert code == 2, output  # ids and --all together
    assert await count_set_aside(telemetry.runtime.db) == 1


async def test_a_request_still_being_stored_keeps_its_arrival_against_a_later_request(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FIXED (I3, I11 "applied in arrival order"): a request reserves its arrival numbers, then
    inserts. Alice's request reserves first but its insert is slower than Bob's; a watcher that
    claims between Bob's insert and Alice's applies Bob's event (higher seq) first, and Bob owns
    the device that Alice's authenticated event reached first. The claim never waited for a
    lower number still in flight; the main line's mark does (processing/progress.py). Bob's
    request reaches another replica: within one process his request would wait for Alice's
    write (ingest/group_commit.py)."""
    _, alice_key = await telemetry.register("alice")
    bob, bob_key = await telemetry.register("bobby")
    real = arrival.reserve
    reserved, go_on = asyncio.Event(), asyncio.Event()

    async def slow_first_reserve(db: Any, count: int, **kwargs: Any) -> int:
        first = await real(db, count, **kwargs)
        if not reserved.is_set():
            reserved.set()
            await go_on.wait()  # the insert of this request is slow
        return first

    monkeypatch.setattr(arrival, "reserve", slow_first_reserve)
    alice_request = asyncio.create_task(telemetry.post(cli_event("shared"), alice_key))
    await reserved.wait()
    async with another_replica(telemetry) as other:
        assert (await other.post(cli_event("shared"), bob_key)).status_code == 202
    await telemetry.watcher.drain()  # a watcher woken by Bob's insert
    go_on.set()
    assert (await alice_request).status_code == 202
    await telemetry.watcher.drain()
    assert await applied_events(telemetry.runtime.db) == 2
    alice = (await telemetry.stats("alice"))["userId"]
    assert await owner_of(telemetry, "shared") == alice, f"bob ({bob}) took the device"


@pytest.mark.parametrize(
    "failure",
    [
        lambda: ExecutionTimeout("operation exceeded time limit", code=50),
        lambda: failpoints.FailpointError("the worker dies on this event"),
    ],
    ids=["execution-timeout", "crash"],
)
async def test_an_event_that_keeps_killing_its_batch_does_not_take_the_batch_with_it(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, failure: Any
) -> None:
    """BUG (I11): a failure events_fault does not blame on the events (a timeout, a worker
    death) is retried as a whole claim after the lease, never split. When one event causes it
    every time (an event heavy enough to time the transaction out, or to get the worker
    OOM-killed), every claim of its batch dies, attempts grow for all of them, and after
    QUEUE_MAX_ATTEMPTS claims _set_aside_exhausted sets aside the whole batch: 9 innocent
    events are dead because of one."""
    real = watcher_module.apply_events
    events = [cli_event("heavy-dev") for _ in range(10)]
    killer = events[3]["insert_id"]

    async def apply_events(db: Any, batch: Any, **kwargs: Any) -> Any:
        if killer in {e.id for e in batch}:
            raise failure()
        return await real(db, batch, **kwargs)

    monkeypatch.setattr(watcher_module, "apply_events", apply_events)
    await telemetry.post({"events": events})
    for _ in range(telemetry.runtime.settings.queue_max_attempts + 2):
        with contextlib.suppress(Exception):
            await telemetry.watcher.process_one_batch()
        await expire_backoffs(telemetry)
    db = telemetry.runtime.db
    dead = {e["_id"] for e in await db[EVENTS_ASIDE].find({"dead": True}).to_list()}
    assert dead <= {killer}, f"{len(dead - {killer})} innocent events set aside"
    assert await applied_events(db) == 9
