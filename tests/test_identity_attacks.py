"""Attacks on identity-by-userId (issue 14) through both services, driven by hand: names reused
and swapped between users with commands applied in every order, held, duplicated,
dead-lettered and retried late; keys unknown, revoked, and resolved after the grace period;
concurrent workers. After each scenario: stats owed under I3, verify clean, every score at its
projection's version, no name held twice."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_contracts import mongo
from swamp_app.settings import AppSettings
from telemetry_service.backfill import Backfill
from telemetry_service.collections import EVENTS, EVENTS_ASIDE, IDENTITY_MAP, USERNAME_METRICS
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.projection.verify import verify
from telemetry_service.settings import TelemetrySettings
from tests.pipeline import Pipeline, pipeline_of
from tests.support import unapplied_events

_examples = itertools.count()
#: Small by default (make test); raise it to explore.
EXAMPLES = int(os.environ.get("IDENTITY_ATTACK_EXAMPLES", "10"))


@pytest.fixture
async def pipeline(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> AsyncIterator[Pipeline]:
    async with pipeline_of(telemetry_settings, app_settings) as running:
        yield running


async def assert_consistent(p: Pipeline) -> None:
    """Every live user's score at its projection's version, no name held twice, verify clean."""
    db = p.telemetry_runtime.db
    async for score in p.app_runtime.db.user_scores.find({}):
        projection = await p.projection(score["_id"])
        assert projection is not None, score
        assert score["sourceVersion"] == projection["projectionVersion"], score["username"]
    for collection in (IDENTITY_MAP, USERNAME_METRICS):
        names = [d["username"] async for d in db[collection].find({"username": {"$exists": 1}})]
        assert len(names) == len(set(names)), (collection, names)
    report = await verify(db, p.telemetry_runtime.bus)
    assert report.clean, report.as_dict()


async def owned_stats(p: Pipeline, username: str, user_id: str, total: int) -> None:
    stats = await p.stats(username)
    assert stats is not None, f"{username} is 404"
    assert (stats["userId"], stats["totalInvocations"]) == (user_id, total), username


async def quiesce(p: Pipeline) -> None:
    """Everything held or dead is let go, and the retry delay of events waiting for their key
    has passed (their keys are known by then)."""
    await p.release_commands()
    await p.retry_dead_commands()
    await p.drain()
    # Followers parked behind a command whose ordering key a test stripped: as the engine's
    # promote after each finish would have done.
    for key in await p.commands.distinct("orderingKey", {"status": "pending"}):
        await p.telemetry_runtime.commands.promote(key)
    await p.drain()
    await mongo.update_many(
        p.telemetry_runtime.db[EVENTS_ASIDE],
        {"processed": False, "dead": {"$ne": True}},
        {"$set": {"leaseUntil": datetime.now(UTC)}},
    )
    await p.drain()


# --- ownership of a shared device when the first key is not known yet ----------------------


async def test_a_waiting_key_that_arrived_first_still_owns_the_shared_device(
    pipeline: Pipeline,
) -> None:
    """FOUND, then fixed: events claim in the server's arrival order, and an authenticated event
    on a device with no owner yet waits behind an earlier one whose key is not known yet
    (processing/watcher.py behind_a_waiting_key).

    (I3: the owner is "the user whose authenticated event reached the server first,
    arrival order"). ana registers and at once sends from the shared CI box; telemetry has not
    applied her api_key_issued yet, so her event waits. ben (known for long) sends from the same
    box a moment later; his event is applied first and ben becomes the box's owner. Its
    anonymous history (before and after) goes to ben, not to ana, for ever.

    Cause: processing/watcher.py apply_batch: attribute() sets the waiting event aside and
    devices/store.py assign_owners (called via apply_events) picks the owner among the *ready*
    events only; a device with an earlier authenticated event still waiting for its key gets
    its owner from a later one (ownership follows apply order, not arrival order)."""
    p = pipeline
    ben = await p.register("ben")
    await p.drain()
    ana = await p.register("ana")
    await p.hold_commands(userId=ana["id"])  # telemetry has a backlog
    await p.send("ci-box", count=2)  # anonymous history from before
    await p.send("ci-box", ana["apiKey"])  # arrives first
    await p.send("ci-box", ben["apiKey"])  # arrives second
    await p.drain()
    device = await p.telemetry_runtime.db.user_metrics.find_one({"_id": "ci-box"})
    assert "ownerUserId" not in (device or {}), "ben's event did not wait behind ana's"
    await p.release_commands()
    await p.drain()
    await mongo.update_many(
        p.telemetry_runtime.db[EVENTS_ASIDE],  # the retry interval passes
        {"processed": False},
        {"$set": {"leaseUntil": datetime.now(UTC)}},
    )
    await p.drain()
    await p.send("ci-box")  # anonymous, after
    await p.drain()
    device = await p.telemetry_runtime.db.user_metrics.find_one({"_id": "ci-box"})
    assert device is not None
    assert device["ownerUserId"] == ana["id"], "ben's later event took the device"
    await owned_stats(p, "ana", ana["id"], 1 + 3)
    await owned_stats(p, "ben", ben["id"], 1)


# --- a chain of name swaps with registrations racing, applied in any order -----------------


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_a_rename_chain_with_a_racing_registration_in_any_order(
    pipeline: Pipeline, data: st.DataObject
) -> None:
    """Holds. Users a, b, c rotate names (c->t, b->c, a->b, t->a) and d registers the freed t,
    all in one burst; telemetry applies the five name commands in any order, some twice, some
    dead-lettered and retried at the end. Everyone ends with their own history under their
    app name, and a freed name starts empty for its taker."""
    p = pipeline
    n = next(_examples)
    a, b, c, t = (f"{x}{n}-x" for x in "abct")
    ua, ub, uc = [await p.register(name) for name in (a, b, c)]
    for count, user in enumerate((ua, ub, uc), start=1):
        await p.send(f"{user['id']}-dev", user["apiKey"], count=count)
    await p.drain()

    for key, new in ((uc["apiKey"], t), (ub["apiKey"], c), (ua["apiKey"], b), (uc["apiKey"], a)):
        assert (await p.rename(key, new)).status_code == 200
    ud = await p.register(t)
    await p.send(f"{ud['id']}-dev", ud["apiKey"])
    names = {"type": {"$in": ["username_changed", "user_registered"]}}
    assert await p.hold_commands(**names) == 5
    ours = {"userId": {"$in": [u["id"] for u in (ua, ub, uc, ud)]}, "held": True}
    held = await p.commands.find(ours, sort=[("seq", 1)]).to_list()
    assert len(held) == 5
    # Free the held commands from their per-user order: any order can reach the consumer
    # (dead letters retried late, redelivery after a lost lease).
    await mongo.update_many(p.commands, ours, {"$unset": {"orderingKey": ""}})
    order = data.draw(st.permutations(range(5)), label="order")
    dead = {held[i]["_id"] for i in data.draw(st.sets(st.integers(0, 4), max_size=2), "dead")}
    twice = {held[i]["_id"] for i in data.draw(st.sets(st.integers(0, 4), max_size=2), "twice")}
    for doc in (held[i] for i in order):
        if doc["_id"] in dead:
            await p.commands.update_one(
                {"_id": doc["_id"]},
                {
                    "$set": {"status": "dead", "lastError": {"type": "Test", "message": "x"}},
                    "$unset": {"held": ""},
                },
            )
            continue
        await p.commands.update_one(
            {"_id": doc["_id"]},
            {"$set": {"availableAt": datetime.now(UTC)}, "$unset": {"held": ""}},
        )
        await p.drain()
        if doc["_id"] in twice:
            copy = {k: v for k, v in doc.items() if k not in ("_id", "held", "orderingKey")}
            copy |= {"status": "pending", "availableAt": datetime.now(UTC), "attempts": 0}
            await p.commands.insert_one(copy)
            await p.drain()
    await quiesce(p)

    await owned_stats(p, a, uc["id"], 3)
    await owned_stats(p, b, ua["id"], 1)
    await owned_stats(p, c, ub["id"], 2)
    await owned_stats(p, t, ud["id"], 1)
    await assert_consistent(p)


# --- concurrency ----------------------------------------------------------------------------


async def test_concurrent_consumers_and_watchers_on_a_burst_of_renames(pipeline: Pipeline) -> None:
    """Holds. Three command consumers and three watchers run at once (asyncio.gather) on a
    burst of swaps, registrations of freed names and events: write conflicts and unique-index
    races between transactions end in the same state as one worker would reach."""
    p = pipeline
    users = [await p.register(f"cc-{i}") for i in range(4)]
    for i, user in enumerate(users):
        await p.send(f"cc-dev-{i}", user["apiKey"], count=i + 1)
    await p.drain()
    await p.hold_commands()
    # A rotation through a temporary name, and a newcomer on the freed temporary name.
    assert (await p.rename(users[3]["apiKey"], "cc-tmp")).status_code == 200
    for i in (2, 1, 0):
        assert (await p.rename(users[i]["apiKey"], f"cc-{i + 1}")).status_code == 200
    assert (await p.rename(users[3]["apiKey"], "cc-0")).status_code == 200
    newcomer = await p.register("cc-tmp")
    for i, user in enumerate([*users, newcomer]):
        await p.send(f"cc-dev-{i}", user["apiKey"])
    await p.release_commands()
    rt = p.telemetry_runtime

    async def consume() -> None:
        await command_consumer(rt).drain()

    async def watch() -> None:
        await IngestWatcher(rt).drain()

    results = await asyncio.gather(
        *(consume() for _ in range(3)), *(watch() for _ in range(3)), return_exceptions=True
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    await quiesce(p)
    await owned_stats(p, "cc-1", users[0]["id"], 2)
    await owned_stats(p, "cc-2", users[1]["id"], 3)
    await owned_stats(p, "cc-3", users[2]["id"], 4)
    await owned_stats(p, "cc-0", users[3]["id"], 5)
    await owned_stats(p, "cc-tmp", newcomer["id"], 1)
    await assert_consistent(p)


# --- keys: revoked in flight, deleted users, unknown past the grace period -----------------


async def test_a_revoked_key_and_a_deleted_users_key_with_events_in_flight(
    pipeline: Pipeline,
) -> None:
    """Holds. Events sent with a key that is revoked (and with a deleted user's keys) before
    the watcher applies them count as their device's anonymous events: for the device's owner,
    never for anyone else. The deleted user's name stays reserved and nobody gets its data."""
    p = pipeline
    kim = await p.register("kim")
    await p.send("kim-dev", kim["apiKey"], count=2)
    lee = await p.register("lee")
    await p.send("lee-dev", lee["apiKey"])
    await p.drain()
    second = await p.new_key(kim["apiKey"])
    await p.send("kim-dev", second["apiKey"])  # in flight...
    await p.send("lee-dev", second["apiKey"])  # ...on lee's device too
    await p.revoke(kim["apiKey"], second["id"])  # ...revoked before it is applied
    await p.send("lee-dev", lee["apiKey"], count=2)
    await p.delete(lee["apiKey"])  # lee's own key: revoked while its events are in flight
    await p.drain()
    await owned_stats(p, "kim", kim["id"], 3)  # 2 + the revoked-key event on kim's device
    await owned_stats(p, "lee", lee["id"], 4)  # 1 + its device's 3 anonymous ones
    assert (await p.app.post("/v1/users", json={"username": "lee"})).status_code == 409
    await assert_consistent(p)


async def test_a_key_unknown_past_the_grace_period_and_issued_later(pipeline: Pipeline) -> None:
    """Holds. A fresh user's key stays unknown to telemetry past KEY_RESOLVE_GRACE_SECONDS:
    its events count as anonymous on their device; once the key is issued, the next
    authenticated event binds the device and the user gets its anonymous history too."""
    p = pipeline
    max_ = await p.register("max")
    await p.hold_commands(userId=max_["id"])
    await p.send("max-dev", max_["apiKey"], count=2)
    await p.drain()  # waiting
    events, aside = p.telemetry_runtime.db[EVENTS], p.telemetry_runtime.db[EVENTS_ASIDE]
    assert await aside.count_documents({"processed": False}) == 2
    old = datetime.now(UTC) - timedelta(
        seconds=p.telemetry_runtime.settings.key_resolve_grace_seconds + 5
    )
    await mongo.update_many(aside, {}, {"$set": {"receivedAt": old, "leaseUntil": old}})
    await p.drain()  # past the grace period: anonymous
    assert await unapplied_events(events.database) == 0
    assert await events.count_documents({"unattributed": "unknown"}) == 2
    await p.release_commands()
    await p.drain()
    await owned_stats(p, "max", max_["id"], 0)
    await p.send("max-dev", max_["apiKey"])
    await p.drain()
    await owned_stats(p, "max", max_["id"], 3)
    await assert_consistent(p)


# --- a random program of everything at once -------------------------------------------------

step = st.one_of(
    st.tuples(st.just("register"), st.integers(0, 3)),
    st.tuples(st.just("rename"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("send"), st.none() | st.integers(0, 3), st.integers(0, 2), st.integers(1, 2)),
    st.tuples(st.just("hold"), st.integers(0, 3)),
    st.tuples(st.just("dead")),
    st.tuples(st.just("drain")),
    st.tuples(st.just("commands_only")),
    st.tuples(st.just("backfill")),
    st.tuples(st.just("delete"), st.integers(0, 3)),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=st.lists(step, min_size=4, max_size=14))
async def test_a_random_program_of_registrations_renames_deletions_and_events(
    pipeline: Pipeline, program: list[tuple[Any, ...]]
) -> None:
    """Holds so far. Registrations of any of four names, renames among them, deletions,
    authenticated and anonymous events on shared devices, commands held and dead-lettered,
    partial drains and a backfill re-run, in any interleaving. After quiescence every user's
    stats (under its app name) are the fold it is owed under I3 (the device's owner, as
    recorded, is one of the users who authenticated on it), and everything is consistent."""
    p = pipeline
    n = next(_examples)
    pool = [f"p{n}-{i}" for i in range(4)]
    users: list[dict[str, Any]] = []  # id, apiKey, name, deleted
    anon: dict[str, int] = {}
    own: dict[tuple[str, str], int] = {}  # (device, userId) -> authenticated events
    authenticated: dict[str, set[str]] = {}
    for op in program:
        kind = op[0]
        if kind == "register":
            response = await p.app.post("/v1/users", json={"username": pool[op[1]]})
            if response.status_code == 201:
                body = response.json()
                users.append({**body, "name": pool[op[1]], "deleted": False})
            else:
                assert response.status_code == 409, response.text
        elif kind == "rename" and users:
            user = users[op[1] % len(users)]
            if user["deleted"]:
                continue
            response = await p.rename(user["apiKey"], pool[op[2]])
            assert response.status_code in (200, 409), response.text
            if response.status_code == 200:
                user["name"] = pool[op[2]]
        elif kind == "send":
            device = f"p{n}-dev-{op[2]}"
            user = users[op[1] % len(users)] if users and op[1] is not None else None
            await p.send(device, user["apiKey"] if user else None, count=op[3])
            if user is None or user["deleted"]:
                anon[device] = anon.get(device, 0) + op[3]
            else:
                own[(device, user["id"])] = own.get((device, user["id"]), 0) + op[3]
                authenticated.setdefault(device, set()).add(user["id"])
        elif kind == "hold" and users:
            await p.hold_commands(userId=users[op[1] % len(users)]["id"])
        elif kind == "dead":
            await p.dead_letter_commands(type="username_changed")
        elif kind == "drain":
            await p.drain()
        elif kind == "commands_only":
            await command_consumer(p.telemetry_runtime).drain()
        elif kind == "backfill":
            await Backfill(p.telemetry_runtime).reset()
            await Backfill(p.telemetry_runtime).run_if_needed()
        elif kind == "delete" and users:
            user = users[op[1] % len(users)]
            if not user["deleted"]:
                await quiesce(p)  # its in-flight events are applied under its key first
                await p.delete(user["apiKey"])
                user["deleted"] = True
    await quiesce(p)

    owners: dict[str, str | None] = {}
    async for device in p.telemetry_runtime.db.user_metrics.find({"_id": {"$regex": f"^p{n}-"}}):
        owners[device["_id"]] = device.get("ownerUserId")
        if device["_id"] in authenticated:
            assert owners[device["_id"]] in authenticated[device["_id"]]
    for user in users:
        owed = sum(c for (_, u), c in own.items() if u == user["id"])
        owed += sum(c for d, c in anon.items() if owners.get(d) == user["id"])
        await owned_stats(p, user["name"], user["id"], owed)
    await assert_consistent(p)


async def test_a_rename_transaction_rerun_after_a_write_conflict(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holds. While a username_changed transaction is open, the watcher commits a new device
    for the same user and the name's previous holder: the rename's transaction conflicts and
    runs again from the start, and folds what is there now."""
    from telemetry_service.identity import store as identity_store

    p = pipeline
    una = await p.register("una")
    vic = await p.register("vic")
    await p.send("una-1", una["apiKey"], count=2)
    await p.send("vic-1", vic["apiKey"])
    await p.drain()
    assert (await p.rename(vic["apiKey"], "vic2")).status_code == 200
    await p.hold_commands(userId=vic["id"])
    assert (await p.rename(una["apiKey"], "vic")).status_code == 200
    await p.send("una-2", una["apiKey"], count=3)
    await p.send("vic-2", vic["apiKey"])
    real = identity_store.claim_name
    calls = 0

    async def racing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            # The rename's transaction has read (its snapshot is set) and not written yet.
            await IngestWatcher(p.telemetry_runtime).drain()
        return await real(*args, **kwargs)

    monkeypatch.setattr(identity_store, "claim_name", racing)
    await command_consumer(p.telemetry_runtime).drain()
    assert calls >= 2  # it ran again
    monkeypatch.setattr(identity_store, "claim_name", real)
    await quiesce(p)
    await owned_stats(p, "vic", una["id"], 5)
    await owned_stats(p, "vic2", vic["id"], 2)
    await assert_consistent(p)
