"""Operators see and retry set-aside events (SPEC I11): `swamp-club events dead|retry|purge`,
the same on the admin API, and a gauge on /metrics."""

from __future__ import annotations

import json

from tests.support import DbNames, swamp_club_cli
from tests.telemetry.conftest import ADMIN, Telemetry, cli_event
from tests.telemetry.test_isolation import store_as_an_older_release_did


async def poisoned(telemetry: Telemetry, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        event = cli_event("old-dev")
        event["properties"]["startedAt"] = "9999-12-31T23:00:00-05:00"
        await store_as_an_older_release_did(telemetry, event)
        ids.append(event["insert_id"])
    await telemetry.drain()
    return ids


async def test_the_admin_api_lists_retries_and_purges_set_aside_events(
    telemetry: Telemetry,
) -> None:
    first, second = await poisoned(telemetry, 2)
    listed = await telemetry.http.get("/admin/events/dead", headers=ADMIN)
    assert listed.status_code == 200
    body = listed.json()
    assert body["setAside"] == 2
    assert {e["id"] for e in body["events"]} == {first, second}
    assert all(e["lastError"].startswith("unreadable") for e in body["events"])
    assert (await telemetry.http.get("/admin/events/dead")).status_code == 401

    metrics = (await telemetry.http.get("/metrics")).text
    assert 'swamp_ingest_events_set_aside{service="telemetry"} 2.0' in metrics

    retried = await telemetry.http.post(
        "/admin/events/dead/retry", json={"ids": [first]}, headers=ADMIN
    )
    assert retried.json() == {"retried": 1}
    await telemetry.drain()  # still unreadable: set aside again, with its reason
    purged = await telemetry.http.post("/admin/events/dead/purge", json={}, headers=ADMIN)
    assert purged.json() == {"purged": 2}
    assert (await telemetry.http.get("/admin/events/dead", headers=ADMIN)).json()["setAside"] == 0


async def test_the_events_command_line(
    telemetry: Telemetry, mongo_uri: str, db_names: DbNames
) -> None:
    first, second = await poisoned(telemetry, 2)

    async def swamp_club(*args: str) -> tuple[int, str]:
        code, output = await swamp_club_cli(mongo_uri, db_names, "events", *args)
        return code, output

    code, output = await swamp_club("dead", "--json")
    assert code == 0
    listed = json.loads(output)
    assert (listed["setAside"], {e["id"] for e in listed["events"]}) == (2, {first, second})
    code, output = await swamp_club("dead")
    assert "2 event(s) set aside" in output
    assert (await swamp_club("retry"))[0] == 2  # ids or --all, not neither
    assert await swamp_club("retry", first, "--json") == (0, '{"retried": 1}\n')
    assert (await swamp_club("retry", "no-such-event"))[0] == 2  # not a set-aside event
    assert await swamp_club("purge", "--all", "--json") == (0, '{"purged": 1}\n')
