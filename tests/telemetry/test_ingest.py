"""POST /ingest with what the real CLI sends, and what the watcher makes of it."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

from shared_contracts import failpoints
from telemetry_service.collections import EVENTS
from telemetry_service.ingest.router import BEFORE_REPLY
from tests.telemetry.conftest import CLI_EVENT, Telemetry, cli_event


async def stored(telemetry: Telemetry) -> int:
    return await telemetry.runtime.db[EVENTS].count_documents({})


async def test_the_documented_single_event_is_accepted_stored_and_processed(
    telemetry: Telemetry,
) -> None:
    response = await telemetry.post(CLI_EVENT)
    assert response.status_code == 202
    assert response.json() == {"accepted": 1, "duplicates": 0}
    raw = await telemetry.runtime.db[EVENTS].find_one({"_id": CLI_EVENT["insert_id"]})
    assert raw["raw"] == CLI_EVENT  # unknown properties ($repo_id, errorType, ...) kept
    await telemetry.drain()
    device = await telemetry.device(CLI_EVENT["distinct_id"])
    assert device.status_code == 200
    body = device.json()
    assert body["ownerUserId"] is None
    assert body["anonymous"]["invocations"] == 1
    assert body["anonymous"]["failureCount"] == 1
    assert body["anonymous"]["commandCounts"] == {"model create": 1}
    # The documented startedAt (2026-09-14) is outside [receivedAt - 8 days, receivedAt + 5 min]
    # whenever these tests run, so the day is the server's (SPEC I12): the UTC day received.
    received = raw["receivedAt"]
    assert (
        not received - timedelta(days=8)
        <= datetime(2026, 9, 14, tzinfo=UTC)
        <= received + timedelta(minutes=5)
    )
    assert body["anonymous"]["activeDays"] == [received.astimezone(UTC).date().isoformat()]


async def test_a_batch_is_accepted_and_counted(telemetry: Telemetry) -> None:
    _, key = await telemetry.register("alice")
    events = [cli_event("dev-a") for _ in range(3)] + [cli_event("dev-a", status="user_error")]
    response = await telemetry.post({"events": events}, key)
    assert response.json() == {"accepted": 4, "duplicates": 0}
    await telemetry.drain()
    stats = await telemetry.stats("alice")
    assert stats["totalInvocations"] == 4
    assert stats["successCount"] == 3
    assert stats["failureCount"] == 1
    assert stats["userErrorCount"] == 1
    assert stats["distinctIds"] == ["dev-a"]
    assert stats["activeDays"] == 1


async def test_both_auth_headers_authenticate(telemetry: Telemetry) -> None:
    _, key = await telemetry.register("bob")
    assert (await telemetry.post(cli_event("dev-b"), key)).status_code == 202
    bearer = {"Authorization": f"Bearer {key}"}
    assert (
        await telemetry.http.post("/ingest", json=cli_event("dev-b"), headers=bearer)
    ).status_code == 202
    await telemetry.drain()
    assert (await telemetry.stats("bob"))["totalInvocations"] == 2


async def test_an_event_without_insert_id_is_identified_by_properties_id(
    telemetry: Telemetry,
) -> None:
    event = cli_event("dev-d", insert_id=False)
    assert (await telemetry.post(event)).json() == {"accepted": 1, "duplicates": 0}
    assert (await telemetry.post(event)).json() == {"accepted": 0, "duplicates": 1}
    assert await telemetry.runtime.db[EVENTS].find_one({"_id": event["properties"]["id"]})


async def test_re_sent_events_are_counted_once(telemetry: Telemetry) -> None:
    _, key = await telemetry.register("dave")
    first = [cli_event("dev-e") for _ in range(3)]
    await telemetry.post({"events": first}, key)
    await telemetry.drain()
    later = [*first[:2], cli_event("dev-e"), first[0]]  # re-sent, new, and a repeat within it
    response = await telemetry.post({"events": later}, key)
    assert response.json() == {"accepted": 1, "duplicates": 3}
    same = [cli_event("dev-e") for _ in range(5)]
    responses = await asyncio.gather(
        telemetry.post({"events": same}, key), telemetry.post({"events": same}, key)
    )
    assert all(r.status_code == 202 for r in responses)
    assert sum(r.json()["accepted"] for r in responses) == 5
    await telemetry.drain()
    assert (await telemetry.stats("dave"))["totalInvocations"] == 9


async def test_a_crash_after_storing_and_before_the_202_loses_and_doubles_nothing(
    telemetry: Telemetry,
) -> None:
    # Stored, but the CLI never hears 202: it re-sends the same batch, which is answered 202
    # as duplicates and counted once.
    _, key = await telemetry.register("erin")
    batch = {"events": [cli_event("dev-f") for _ in range(4)]}
    failpoints.arm(BEFORE_REPLY, times=1)
    try:
        with pytest.raises(failpoints.FailpointError):
            await telemetry.post(batch, key)
    finally:
        failpoints.disarm()
    assert await stored(telemetry) == 4
    resent = await telemetry.post(batch, key)
    assert (resent.status_code, resent.json()) == (202, {"accepted": 0, "duplicates": 4})
    await telemetry.drain()
    assert (await telemetry.stats("erin"))["totalInvocations"] == 4


async def test_anonymous_history_is_credited_to_the_user_who_logs_in(telemetry: Telemetry) -> None:
    await telemetry.post({"events": [cli_event("laptop") for _ in range(3)]})
    await telemetry.drain()
    erin, key = await telemetry.register("erin")
    await telemetry.post(cli_event("laptop"), key)
    await telemetry.drain()
    stats = await telemetry.stats("erin")
    assert stats["totalInvocations"] == 4
    refreshes = await telemetry.refreshes(erin)
    assert refreshes[-1]["reason"] == "binding"


async def test_anonymous_events_on_a_bound_device_re_score_its_owner(telemetry: Telemetry) -> None:
    """The original's sibling gap: the batch has no username, yet its owner changed."""
    frank, key = await telemetry.register("frank")
    await telemetry.post(cli_event("desk"), key)
    await telemetry.drain()
    before = (await telemetry.stats("frank"))["projectionVersion"]
    await telemetry.post({"events": [cli_event("desk") for _ in range(2)]})  # no key at all
    await telemetry.drain()
    stats = await telemetry.stats("frank")
    assert stats["totalInvocations"] == 3
    assert stats["projectionVersion"] == before + 1
    (pending,) = [r for r in await telemetry.refreshes(frank) if r["status"] == "pending"]
    assert pending["projectionVersion"] == before + 1
    assert pending["snapshot"]["totalInvocations"] == 3
    assert pending["reason"] == "ingest"


async def test_a_shared_device_never_moves_history_between_users(telemetry: Telemetry) -> None:
    _, key_a = await telemetry.register("gina")
    _, key_b = await telemetry.register("hank")
    await telemetry.post({"events": [cli_event("shared") for _ in range(2)]})  # anonymous
    await telemetry.post(cli_event("shared"), key_a)  # gina authenticates first: owner
    await telemetry.drain()
    for round_ in range(3):  # alternate; anonymous events keep arriving
        await telemetry.post(cli_event("shared"), key_b)
        await telemetry.post(cli_event("shared"))
        await telemetry.drain()
        gina, hank = await telemetry.stats("gina"), await telemetry.stats("hank")
        assert gina["totalInvocations"] == 2 + 1 + (round_ + 1)  # anon before+after, her own
        assert hank["totalInvocations"] == round_ + 1  # only his own, ever
    device = await telemetry.device("shared")
    assert device.json()["ownerUserId"] == (await telemetry.stats("gina"))["userId"]
    assert {
        r["username"] for r in await telemetry.runtime.refreshes.collection.find().to_list()
    } >= {
        "gina",
        "hank",
    }


async def test_a_registered_user_without_events_has_zeros(telemetry: Telemetry) -> None:
    await telemetry.register("ivan")
    stats = await telemetry.stats("ivan")
    assert stats["totalInvocations"] == 0
    assert stats["distinctIds"] == []
    assert stats["firstSeenAt"] is None


async def test_stats_errors(telemetry: Telemetry) -> None:
    missing = await telemetry.http.get("/v1/stats", params={"username": "nobody"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    bad = await telemetry.http.get("/v1/stats", params={"username": "Not Valid!"})
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["loc"] == "query.username"
    both = await telemetry.http.get("/v1/stats", params={"username": "ivan", "distinct_id": "x"})
    assert both.status_code == 422
    assert (await telemetry.http.get("/v1/stats")).status_code == 422


async def test_no_api_key_ever_reaches_the_logs(
    telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, key = await telemetry.register("kim")
    await telemetry.post(cli_event("k-dev"), key)
    await telemetry.http.post(
        "/ingest", json=cli_event("k-dev"), headers={"Authorization": f"Bearer {key}"}
    )
    await telemetry.post(cli_event("k-dev"), "swamp_wrong-key-value")
    await telemetry.drain()
    logged = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    assert key not in logged
    assert "swamp_wrong-key-value" not in logged
