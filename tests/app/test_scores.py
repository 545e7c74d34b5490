"""Score refreshes (I9), history, leaderboard, and the scoring formula's properties."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pymongo import monitoring

from shared_contracts.messages import ScoreRefresh
from shared_contracts.mongo import make_client
from swamp_app.collections import USER_SCORES, USERS
from swamp_app.scores.repository import apply_refresh
from swamp_app.scores.scoring import activity_score, canonical_score, score_sources
from swamp_app.settings import AppSettings
from tests.app.conftest import App


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
    commands = ScoreCommands()
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
        assert commands.names == ["update"]
        assert await outcome(user["id"], 2) == "stale"
        assert await outcome(user["id"], 1) == "stale"
        assert await outcome("nobody", 3) == "unknown_user"
    finally:
        await client.close()
    assert (await app.score("fred"))["sourceVersion"] == 2


class ScoreCommands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command.get(event.command_name) == USER_SCORES:
            self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


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
