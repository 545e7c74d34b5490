"""Score refreshes (I9), history, leaderboard, and the scoring formula's properties."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts import mongo
from shared_contracts.messages import ScoreRefresh
from shared_contracts.mongo import in_transaction, make_client
from shared_contracts.queue.consumer import Consumer, Delivery
from shared_contracts.queue.engine import Queue
from swamp_app.collections import USER_SCORES, USERS
from swamp_app.runtime import AppRuntime
from swamp_app.scores.consumer import score_refresh_consumer
from swamp_app.scores.repository import apply_refresh, apply_refreshes
from swamp_app.scores.scoring import activity_score, canonical_score, score_sources
from swamp_app.settings import AppSettings
from tests.app.conftest import App
from tests.support import SeenCommands, eventually


def snapshot(days: int, successes: int, commands: dict[str, int] | None = None) -> dict[str, Any]:
    return {"activeDays": days, "successCount": successes, "commandCounts": commands or {}}


async def refresh(app: App, username: str, version: int, snap: dict[str, Any]) -> None:
    """A refresh for the user who holds ``username`` (a made-up userId if nobody does)."""
    user = await app.runtime.db[USERS].find_one({"username": username})
    user_id = user["_id"] if user else f"no-such-user-{username}"
    await app.runtime.refreshes.publish(
        ScoreRefresh(
            userId=user_id,
            username=username,
            reason="ingest",
            projectionVersion=version,
            snapshot=snap,
        )
    )
    await app.apply_refreshes()


async def test_newer_refreshes_apply_older_and_equal_ones_do_not(app: App) -> None:
    await app.register("alice")
    await refresh(app, "alice", 5, snapshot(3, 10, {"model": 4}))
    expected = canonical_score(score_sources(snapshot(3, 10, {"model": 4})))
    score = await app.score("alice")
    assert (score["sourceVersion"], score["canonicalScore"]) == (5, expected)
    assert score["scoreSources"] == {"activity": expected}
    await refresh(app, "alice", 4, snapshot(99, 99))  # reordered: older
    await refresh(app, "alice", 5, snapshot(99, 99))  # redelivered: equal
    score = await app.score("alice")
    assert (score["sourceVersion"], score["canonicalScore"]) == (5, expected)
    assert [h["projectionVersion"] for h in score["scoreHistory"]] == [5]


async def test_history_is_bounded_newest_last(app: App) -> None:
    await app.register("bob")
    for version in range(1, 6):
        await refresh(app, "bob", version, snapshot(version, version))
    history = (await app.score("bob"))["scoreHistory"]
    assert [h["projectionVersion"] for h in history] == [3, 4, 5]  # cap 3 in these tests
    assert history[-1]["reason"] == "ingest"


async def test_a_refresh_for_an_unknown_username_is_acknowledged(app: App) -> None:
    await refresh(app, "ghost", 1, snapshot(1, 1))
    (message,) = await app.runtime.refreshes.collection.find().to_list()
    assert message["status"] == "done"


async def test_a_refresh_says_what_it_did_and_a_newer_one_costs_one_command(
    app: App, app_settings: AppSettings
) -> None:
    user = await app.register("fred")
    commands = SeenCommands()
    client = make_client(app_settings.mongodb_uri, app_name="scores", event_listeners=[commands])
    db = client[app.runtime.db.name]

    async def outcome(user_id: str, version: int) -> str:
        message = ScoreRefresh(
            userId=user_id,
            username="fred",
            reason="ingest",
            projectionVersion=version,
            snapshot=snapshot(version, 1),
        )
        return await apply_refresh(db, message, history_cap=3, session=None)

    try:
        assert await outcome(user["id"], 2) == "applied"
        assert commands.names(USER_SCORES) == ["update"]
        assert await outcome(user["id"], 2) == "stale"
        assert await outcome(user["id"], 1) == "stale"
        assert await outcome("nobody", 3) == "unknown_user"
    finally:
        await client.close()
    assert (await app.score("fred"))["sourceVersion"] == 2


async def test_refreshes_waiting_together_are_applied_in_one_transaction_of_few_commands(
    app: App, app_settings: AppSettings
) -> None:
    """A watcher batch publishes a refresh per user it changed; the app claims and applies
    them together: a fixed handful of commands, not half a dozen per refresh."""
    users = [await app.register(f"batch{n}") for n in range(30)]
    for n, user in enumerate(users):
        await app.runtime.refreshes.publish(made_refresh(user["id"], 1, snapshot(n + 1, 1)))
    # and one for a user the app does not know
    await app.runtime.refreshes.publish(made_refresh("nobody", 1, snapshot(1, 1)))
    commands = SeenCommands()
    client = make_client(app_settings.mongodb_uri, app_name="scores", event_listeners=[commands])
    settings_ = app.runtime.settings.model_copy(update={"score_refresh_batch_size": 100})
    try:
        assert await score_refresh_consumer(AppRuntime(settings_, client)).drain() == 31
    finally:
        await client.close()
    # claim (find, update, commit, find), ordering keys (find active, find pending, commit: one
    # indexed read per status, in one snapshot, shared_contracts/queue/engine.py), versions
    # (find), bulk write (update), ack (update), commit, parked check (find); then the empty
    # claim (find)
    assert len(commands.seen) <= 13, commands.seen
    for n in range(30):
        score = await app.score(f"batch{n}")
        expected = canonical_score(score_sources(snapshot(n + 1, 1)))
        assert (score["sourceVersion"], score["canonicalScore"]) == (1, expected)
    done = await app.runtime.refreshes.collection.count_documents({"status": "done"})
    assert done == 31


refresh_batches = st.lists(
    st.tuples(st.sampled_from(["uu1", "uu2", "uu3", "ghost"]), st.integers(1, 6)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(batches=st.lists(refresh_batches, min_size=1, max_size=4))
async def test_a_batch_applies_per_user_the_newest_version_newer_than_the_score(
    app: App, batches: list[list[tuple[str, int]]]
) -> None:
    """However refreshes are grouped (duplicates, reordering, several of one user in one
    batch), each known user ends at the highest version seen, its history strictly rising,
    and each outcome says what happened."""
    ids = {}
    for name in ("uu1", "uu2", "uu3"):
        user = await app.runtime.db[USERS].find_one({"username": name})
        ids[name] = user["_id"] if user else (await app.register(name))["id"]
    await mongo.update_many(
        app.runtime.db[USER_SCORES], {}, {"$set": {"sourceVersion": 0, "scoreHistory": []}}
    )
    best: dict[str, int] = {}
    for batch in batches:
        refreshes = [
            made_refresh(ids.get(name, "ghost-id"), v, snapshot(v, v)) for name, v in batch
        ]
        outcomes = await applied_together(app, refreshes)
        for (name, version), outcome in zip(batch, outcomes, strict=True):
            if name == "ghost":
                assert outcome == "unknown_user"
            elif outcome == "applied":
                assert version > best.get(name, 0)
                assert version == max(v for n, v in batch if n == name)
        for name, version in batch:
            if name != "ghost":
                best[name] = max(best.get(name, 0), version)
    for name in ("uu1", "uu2", "uu3"):
        score = await app.runtime.db[USER_SCORES].find_one({"_id": ids[name]})
        assert score is not None
        assert score["sourceVersion"] == best.get(name, 0)
        history = [h["projectionVersion"] for h in score["scoreHistory"]]
        assert history == sorted(set(history))


def made_refresh(user_id: str, version: int, snap: dict[str, Any]) -> ScoreRefresh:
    return ScoreRefresh(
        userId=user_id, username=None, reason="ingest", projectionVersion=version, snapshot=snap
    )


async def applied_together(app: App, refreshes: list[ScoreRefresh]) -> list[str]:
    outcomes: list[str] = []

    async def apply(session: AsyncClientSession) -> None:
        outcomes[:] = await apply_refreshes(
            app.runtime.db, refreshes, history_cap=1000, session=session
        )

    await in_transaction(app.runtime.client, apply)
    return outcomes


async def test_the_leaderboard_is_sorted_by_canonical_score(app: App) -> None:
    for name, days in (("carol", 1), ("dave", 5), ("erin", 3)):
        await app.register(name)
        await refresh(app, name, 1, snapshot(days, 1))
    board = (await app.http.get("/v1/leaderboard", params={"limit": 2})).json()
    assert [(e["rank"], e["username"]) for e in board["entries"]] == [(1, "dave"), (2, "erin")]
    page = (await app.http.get("/v1/leaderboard", params={"limit": 2, "offset": 2})).json()
    assert [(e["rank"], e["username"]) for e in page["entries"]] == [(3, "carol")]
    assert (await app.http.get("/v1/leaderboard", params={"limit": 0})).status_code == 422


counts = st.integers(min_value=0, max_value=10**6)
commands = st.dictionaries(st.text(min_size=1, max_size=10), st.integers(0, 100), max_size=40)


@given(counts, counts, commands, st.integers(1, 1000))
def test_more_successful_activity_never_lowers_the_score(
    days: int, successes: int, cmds: dict[str, int], more: int
) -> None:
    base = activity_score(snapshot(days, successes, cmds))
    assert activity_score(snapshot(days, successes + more, cmds)) >= base
    assert activity_score(snapshot(days + 1, successes, cmds)) > base
    assert activity_score(snapshot(days, successes, {**cmds, "brand-new-cmd": 1})) >= base


@given(st.dictionaries(st.text(max_size=15), st.none() | st.integers(-(10**6), 10**6) | st.text()))
def test_the_score_is_never_negative_even_for_garbage(garbage: dict[str, Any]) -> None:
    assert activity_score(garbage) >= 0
    assert activity_score({"activeDays": -5, "successCount": -3, "commandCounts": {"x": -1}}) == 0


@given(counts, counts, commands)
def test_the_score_is_deterministic_and_canonical_is_the_sum(
    days: int, successes: int, cmds: dict[str, int]
) -> None:
    snap = snapshot(days, successes, cmds)
    assert activity_score(snap) == activity_score(dict(snap))
    sources = score_sources(snap)
    assert list(sources) == ["activity"]
    assert canonical_score(sources) == round(sum(sources.values()), 2)


@pytest.mark.parametrize("seed", [8, 13, 14])
async def test_concurrent_batch_consumers_end_each_user_at_the_newest_published_version(
    app: App, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """3 batch consumers (batch 5), refreshes published while they run, a batch failing now
    and then (fallback), a slow ordering check: at rest each score carries the newest version
    published for its user (it failed for some seeds: test_two_parks_racing_keep_the_newest_
    refresh)."""
    users = [(await app.register(f"stress{n}"))["id"] for n in range(4)]
    rng = random.Random(seed)
    settings_ = app.runtime.settings.model_copy(update={"score_refresh_batch_size": 5})
    published: dict[str, int] = {}

    def flaky(consumer: Consumer) -> Consumer:
        batch = consumer.batch_handler
        assert batch is not None

        async def on_batch(deliveries: list[Delivery]) -> None:
            await asyncio.sleep(rng.random() * 0.01)
            if rng.random() < 0.2:
                raise RuntimeError("batch trouble")
            await batch(deliveries)

        consumer.batch_handler = on_batch
        return consumer

    # A loaded database: the ordering check's read takes a few ms (widens claim -> park). It
    # is Queue._unfinished, in the claim's transaction since 0079a0b: the method patched here
    # before no longer ran on the batch path, and was removed.
    slow_check = Queue._unfinished

    async def check(self: Queue, keys: Any, **kwargs: Any) -> list[Any]:
        await asyncio.sleep(0.005)
        return await slow_check(self, keys, **kwargs)

    monkeypatch.setattr(Queue, "_unfinished", check)
    workers = [
        flaky(score_refresh_consumer(AppRuntime(settings_, app.runtime.client), worker=f"w{i}"))
        for i in range(3)
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for _ in range(150):
            user = rng.choice(users)
            version = published.get(user, 0) + rng.randint(1, 2)
            published[user] = version
            await app.runtime.refreshes.publish(
                ScoreRefresh(userId=user, username=None, reason="ingest",
                             projectionVersion=version, snapshot={"activeDays": version})
            )  # fmt: skip
            if rng.random() < 0.3:
                await asyncio.sleep(0.005)

        async def settled() -> bool:
            q = app.runtime.refreshes.collection
            return await q.count_documents({"status": {"$in": ["pending", "active"]}}) == 0

        await eventually(settled, within=60)
    finally:
        for w in workers:
            w.stop(grace_seconds=5)
        await asyncio.gather(*tasks)
    final = {}
    for user in users:
        score = await app.runtime.db[USER_SCORES].find_one({"_id": user})
        assert score is not None
        final[user] = score["sourceVersion"]
    assert final == published


async def test_a_batch_whose_worker_died_mid_transaction_is_applied_once_by_another(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the batch's scores were written, before its commit: nothing of it counts;
    the leases run out, the reaper hands the refreshes back, another worker applies each once
    (one history entry per user, at the published version)."""
    users = [(await app.register(f"killed{n}"))["id"] for n in range(5)]
    for n, user in enumerate(users):
        await app.runtime.refreshes.publish(made_refresh(user, 3, snapshot(n + 1, 1)))
    short = app.runtime.settings.model_copy(update={"queue_lease_seconds": 1})  # reaped every 0.5 s
    runtime = AppRuntime(short, app.runtime.client)
    killed = asyncio.Event()
    real_ack_many = Queue.ack_many

    async def die_before_commit(self: Queue, claims: list[Any], *, session: Any) -> None:
        killed.set()
        await asyncio.Event().wait()  # the worker hangs here, then is cancelled: no commit

    monkeypatch.setattr(Queue, "ack_many", die_before_commit)
    doomed = score_refresh_consumer(runtime, worker="doomed")
    task = asyncio.create_task(doomed.run())
    await asyncio.wait_for(killed.wait(), 20)
    task.cancel()  # killed: no release, no renewal
    await asyncio.gather(task, return_exceptions=True)
    monkeypatch.setattr(Queue, "ack_many", real_ack_many)
    for user in users:  # the uncommitted writes are gone
        score = await app.runtime.db[USER_SCORES].find_one({"_id": user})
        assert score is not None
        assert score["sourceVersion"] == 0

    survivor = score_refresh_consumer(runtime, worker="survivor")
    running = asyncio.create_task(survivor.run())
    try:
        await eventually(lambda: _none_unfinished(app), within=30)
    finally:
        survivor.stop(grace_seconds=5)
        await running
    for user in users:
        score = await app.runtime.db[USER_SCORES].find_one({"_id": user})
        assert score is not None
        assert [h["projectionVersion"] for h in score["scoreHistory"]] == [3]


async def _none_unfinished(app: App) -> bool:
    busy = {"status": {"$in": ["pending", "active"]}}
    return await app.runtime.refreshes.collection.count_documents(busy) == 0
