"""The six sequences of issue 14 that went wrong while a username was used as an identity.
Each ends with every user's stats, projection version and score agreeing, and verify clean."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared_contracts.messages import ScoreRefresh
from swamp_app.settings import AppSettings
from telemetry_service import backfill as backfill_module
from telemetry_service.backfill import Backfill
from telemetry_service.projection.verify import find_drift, verify
from telemetry_service.settings import TelemetrySettings
from tests.pipeline import Pipeline, pipeline_of


@pytest.fixture
async def pipeline(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> AsyncIterator[Pipeline]:
    async with pipeline_of(telemetry_settings, app_settings) as running:
        yield running


async def assert_consistent(p: Pipeline, *user_ids: str) -> None:
    """Scores at their projections' versions, and verify clean."""
    for user_id in user_ids:
        projection, score = await p.projection(user_id), await p.stored_score(user_id)
        assert projection is not None
        assert score is not None
        assert score["sourceVersion"] == projection["projectionVersion"], user_id
    report = await verify(p.telemetry_runtime.db, p.telemetry_runtime.bus)
    assert report.clean, report.as_dict()


async def test_1_a_name_taken_at_once_by_another_user(pipeline: Pipeline) -> None:
    """bob registers and renames to carol; alice at once renames to bob. Telemetry applies
    alice's rename before bob's."""
    alice = await pipeline.register("alice")
    await pipeline.send("alice-laptop", alice["apiKey"], count=3)
    await pipeline.send("alice-desk", alice["apiKey"], count=2)
    bob = await pipeline.register("bob")
    await pipeline.send("bob-dev", bob["apiKey"])
    await pipeline.drain()

    assert (await pipeline.rename(bob["apiKey"], "carol")).status_code == 200
    await pipeline.hold_commands(userId=bob["id"])  # bob's rename reaches telemetry late
    assert (await pipeline.rename(alice["apiKey"], "bob")).status_code == 200
    await pipeline.drain()
    stats = await pipeline.stats("bob")
    assert stats is not None
    assert (stats["userId"], stats["totalInvocations"]) == (alice["id"], 5)

    await pipeline.release_commands()
    await pipeline.drain()
    await pipeline.send("alice-laptop", alice["apiKey"])
    await pipeline.send("alice-desk", alice["apiKey"])
    await pipeline.drain()
    alice_stats, carol_stats = await pipeline.stats("bob"), await pipeline.stats("carol")
    assert alice_stats is not None
    assert carol_stats is not None
    assert (alice_stats["userId"], alice_stats["totalInvocations"]) == (alice["id"], 7)
    assert (carol_stats["userId"], carol_stats["totalInvocations"]) == (bob["id"], 1)
    assert await pipeline.stats("alice") is None
    await assert_consistent(pipeline, alice["id"], bob["id"])


async def test_2_a_freed_name_registered_before_telemetry_applied_the_rename(
    pipeline: Pipeline,
) -> None:
    erin = await pipeline.register("erin")
    await pipeline.send("erin-dev", erin["apiKey"], count=4)
    await pipeline.drain()
    assert (await pipeline.rename(erin["apiKey"], "erin2")).status_code == 200
    await pipeline.hold_commands(userId=erin["id"])
    frank = await pipeline.register("erin")  # the freed name, taken a moment later
    await pipeline.drain()
    stats = await pipeline.stats("erin")
    assert stats is not None
    assert (stats["userId"], stats["totalInvocations"]) == (frank["id"], 0)  # starts empty

    await pipeline.release_commands()
    await pipeline.send("frank-dev", frank["apiKey"])
    await pipeline.drain()
    frank_stats, erin_stats = await pipeline.stats("erin"), await pipeline.stats("erin2")
    assert frank_stats is not None
    assert erin_stats is not None
    assert (frank_stats["userId"], frank_stats["totalInvocations"]) == (frank["id"], 1)
    assert (erin_stats["userId"], erin_stats["totalInvocations"]) == (erin["id"], 4)
    assert frank_stats["projectionVersion"] >= 2  # monotonic per user, never restarted
    await assert_consistent(pipeline, erin["id"], frank["id"])


async def test_3_a_refresh_is_applied_to_its_user_never_to_the_names_new_holder(
    pipeline: Pipeline,
) -> None:
    gina = await pipeline.register("gina")
    await pipeline.send("gina-dev", gina["apiKey"], count=5)
    await pipeline.drain()
    gina_score = await pipeline.stored_score(gina["id"])
    assert gina_score is not None
    assert gina_score["canonicalScore"] > 0
    await pipeline.rename(gina["apiKey"], "gina2")
    hank = await pipeline.register("gina")
    await pipeline.drain()
    gina_score = await pipeline.stored_score(gina["id"])
    assert gina_score is not None
    # A late refresh of gina's, still carrying her old name, is applied to gina: by userId.
    await pipeline.app_runtime.refreshes.publish(
        ScoreRefresh(
            userId=gina["id"],
            username="gina",
            reason="ingest",
            projectionVersion=gina_score["sourceVersion"] + 10,
            snapshot={"activeDays": 9, "successCount": 9, "commandCounts": {}},
        )
    )
    await pipeline.drain()
    hank_score = await pipeline.score("gina")
    assert hank_score is not None
    assert hank_score["canonicalScore"] == 0  # not gina's
    hank_projection = await pipeline.projection(hank["id"])
    assert hank_projection is not None
    assert hank_score["sourceVersion"] == hank_projection["projectionVersion"]  # not rejected
    moved = await pipeline.stored_score(gina["id"])
    assert moved is not None
    assert moved["sourceVersion"] == gina_score["sourceVersion"] + 10


async def test_4_a_dead_rename_retried_after_a_newer_one_strands_nothing(
    pipeline: Pipeline,
) -> None:
    ivan = await pipeline.register("ivan")
    await pipeline.send("ivan-dev", ivan["apiKey"], count=3)
    await pipeline.drain()
    await pipeline.rename(ivan["apiKey"], "ivan-b")
    assert await pipeline.dead_letter_commands(type="username_changed") == 1
    await pipeline.rename(ivan["apiKey"], "ivan-c")  # runs, though the earlier one is dead
    await pipeline.drain()
    assert await pipeline.retry_dead_commands() == 1
    await pipeline.drain()  # the old command is stale now: nothing changes
    stats = await pipeline.stats("ivan-c")
    assert stats is not None
    assert stats["totalInvocations"] == 3
    assert await pipeline.stats("ivan-b") is None
    assert await pipeline.stats("ivan") is None
    await assert_consistent(pipeline, ivan["id"])


async def test_5_a_backfill_batch_retried_after_a_write_conflict_folds_what_is_there_now(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a backfill batch's transaction is open, the watcher commits a new device for one of
    its users. The batch must not write a fold that misses it (at a higher version)."""
    judy = await pipeline.register("judy")
    await pipeline.send("judy-1", judy["apiKey"], count=2)
    await pipeline.drain()
    await pipeline.send("judy-2", judy["apiKey"], count=3)  # stored, not applied yet
    real_load_inputs = backfill_module.load_inputs
    calls = 0

    async def load_inputs_racing_the_watcher(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await pipeline.drain()  # another transaction commits in the middle of ours
        return await real_load_inputs(*args, **kwargs)

    monkeypatch.setattr(backfill_module, "load_inputs", load_inputs_racing_the_watcher)
    await Backfill(pipeline.telemetry_runtime).reset()
    assert await Backfill(pipeline.telemetry_runtime).run_if_needed()
    await pipeline.drain()
    stats = await pipeline.stats("judy")
    assert stats is not None
    assert stats["totalInvocations"] == 5
    assert await find_drift(pipeline.telemetry_runtime.db) == []
    await assert_consistent(pipeline, judy["id"])


async def test_6_fresh_keys_work_at_once(pipeline: Pipeline) -> None:
    """20 users send their first event right after registering, before telemetry has applied
    any command: every request is answered 202 and every event counts for its user."""
    users = [await pipeline.register(f"fresh-{i:02d}") for i in range(20)]
    for i, user in enumerate(users):
        await pipeline.send(f"fresh-dev-{i}", user["apiKey"], count=2)
    await pipeline.drain()
    for user in users:
        stats = await pipeline.stats(user["username"])
        assert stats is not None
        assert (stats["userId"], stats["totalInvocations"]) == (user["id"], 2)
    await assert_consistent(pipeline, *(u["id"] for u in users))
