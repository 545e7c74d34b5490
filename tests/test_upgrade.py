"""The upgrade from the username-keyed layout (issue 14): the data directory of the previous
release, with the states its bugs could leave, opened by the new services. Every count is
kept, every version moves forward, and renames work on both sides afterwards."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from swamp_app.settings import AppSettings
from telemetry_service.identity.upgrade import legacy_layout
from telemetry_service.projection.verify import verify
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client, eventually
from tests.telemetry.conftest import cli_event
from tests.telemetry.test_backfill import bucket
from tests.test_system import FAST

OLD_VERSION = 7
NOW = datetime.now(UTC)


def old_score(user_id: str, username: str) -> dict[str, Any]:
    return {
        "_id": user_id,
        "username": username,
        "canonicalScore": 1.0,
        "activityScore": 1.0,
        "scoreSources": {"activity": 1.0},
        "scoreHistory": [],
        "sourceVersion": OLD_VERSION,
        "createdAt": NOW,
        "updatedAt": NOW,
    }


async def write_the_old_layout(client: AsyncMongoClient[Any], t: str, a: str, b: str) -> None:
    """As the previous release stored it. alice and bob are plain; carol's history was split
    across two names by the old rename race (one entry under her old name "cara" left behind);
    dave renamed twice (renameSeq 2); an event of bob's is stored but not applied yet."""
    tdb, adb, bus = client[t], client[a], client[b]
    await tdb.user_metrics.insert_many(
        [
            {"_id": "a-dev", "ownerUserId": "u-a", "anon": bucket(3), "users": {"u-a": bucket(2)},
             "userIds": ["u-a"]},
            {"_id": "b-dev", "ownerUserId": "u-b", "users": {"u-b": bucket(4)}, "userIds": ["u-b"]},
            {"_id": "c-dev1", "ownerUserId": "u-c", "users": {"u-c": bucket(5)},
             "userIds": ["u-c"]},
            {"_id": "c-dev2", "ownerUserId": "u-c", "anon": bucket(1), "users": {"u-c": bucket(6)},
             "userIds": ["u-c"]},
            {"_id": "d-dev", "ownerUserId": "u-d", "users": {"u-d": bucket(1)}, "userIds": ["u-d"]},
        ]
    )  # fmt: skip
    await tdb.identity_map.insert_many(
        [
            {"_id": "alice", "userId": "u-a", "distinctIds": ["a-dev"]},
            {"_id": "bob", "userId": "u-b", "distinctIds": ["b-dev"]},
            {"_id": "carol", "userId": "u-c", "distinctIds": ["c-dev2"]},
            {"_id": "cara", "userId": "u-c", "distinctIds": ["c-dev1"]},
            {"_id": "dave-2", "userId": "u-d", "distinctIds": ["d-dev"]},
        ]
    )
    for username, user_id, total in [
        ("alice", "u-a", 5), ("bob", "u-b", 4), ("carol", "u-c", 7), ("cara", "u-c", 5),
        ("dave-2", "u-d", 1),
    ]:  # fmt: skip
        await tdb.username_metrics.insert_one(
            {"_id": username, "userId": user_id, "totalInvocations": total,
             "projectionVersion": OLD_VERSION}
        )  # fmt: skip
    await tdb.known_users.insert_many(
        [
            {"_id": "u-a", "username": "alice", "renameSeq": 0},
            {"_id": "u-b", "username": "bob", "renameSeq": 0},
            {"_id": "u-c", "username": "carol", "renameSeq": 1},
            {"_id": "u-d", "username": "dave-2", "renameSeq": 2},
        ]
    )
    event = cli_event("b-dev")
    await tdb.events.insert_one(
        {"_id": event["insert_id"], "raw": event, "distinctId": "b-dev", "userId": "u-b",
         "receivedAt": NOW, "processed": False, "leaseUntil": datetime(1970, 1, 1, tzinfo=UTC)}
    )  # fmt: skip
    await tdb.migrations.insert_one(
        {"_id": "username_metrics_backfill", "status": "done", "lastUsername": "dave-2"}
    )
    for user_id, username, seq in [("u-a", "alice", 0), ("u-b", "bob", 0), ("u-c", "carol", 1),
                                   ("u-d", "dave-2", 2)]:  # fmt: skip
        await adb.users.insert_one(
            {"_id": user_id, "username": username, "renameSeq": seq, "createdAt": NOW}
        )
        await adb.user_scores.insert_one(old_score(user_id, username))
    # A refresh of the old release, still waiting: it names only a username.
    await bus.swamp_club_events.insert_one(
        {"type": "score_refresh", "schemaVersion": 1, "username": "alice", "reason": "ingest",
         "projectionVersion": OLD_VERSION, "snapshot": {}, "status": "pending", "attempts": 0,
         "maxAttempts": 8, "availableAt": NOW, "createdAt": NOW, "updatedAt": NOW,
         "dedupeKey": "score_refresh:alice", "orderingKey": "score_refresh:alice", "orderSeq": 1}
    )  # fmt: skip


@pytest.mark.slow
async def test_the_previous_layout_keeps_every_count_after_the_upgrade(
    mongo_client: AsyncMongoClient[Any],
    telemetry_settings: TelemetrySettings,
    app_settings: AppSettings,
) -> None:
    from swamp_app.main import create_app as create_main_app
    from telemetry_service.main import create_app as create_telemetry_app

    await write_the_old_layout(
        mongo_client, telemetry_settings.telemetry_db, app_settings.app_db, app_settings.bus_db
    )
    telemetry_app = create_telemetry_app(
        telemetry_settings.model_copy(update={**FAST, "command_poll_interval_seconds": 0.2})
    )
    main_app = create_main_app(app_settings.model_copy(update=FAST))
    # bucket(n) counts n invocations; the fold is the user's own buckets plus owned anon ones.
    owed = {"alice": 2 + 3, "bob": 4 + 1, "carol": 5 + 6 + 1, "dave-2": 1}
    async with asgi_client(telemetry_app) as telemetry, asgi_client(main_app) as app:
        runtime = telemetry_app.state.runtime

        async def converged() -> bool:
            for username, total in owed.items():
                stats = await telemetry.get("/v1/stats", params={"username": username})
                score = await app.get(f"/v1/users/{username}/score")
                if stats.status_code != 200 or score.status_code != 200:
                    return False
                body = stats.json()
                if body["totalInvocations"] != total:
                    return False
                if score.json()["sourceVersion"] != body["projectionVersion"]:
                    return False
            return True

        await eventually(converged, within=60, interval=0.2)
        assert not await legacy_layout(runtime.db)
        for username in owed:
            stats = (await telemetry.get("/v1/stats", params={"username": username})).json()
            assert stats["projectionVersion"] > OLD_VERSION  # the app's scores move forward
        assert (await telemetry.get("/v1/stats", params={"username": "cara"})).status_code == 404
        carol = await runtime.db.identity_map.find_one({"username": "carol"})
        assert carol["distinctIds"] == ["c-dev1", "c-dev2"]  # the split history is united

        # After the upgrade, a rename is newer than anything applied before it (name clock).
        fresh = (await app.post("/v1/users", json={"username": "erin"})).json()
        renamed = await app.patch(
            "/v1/users/me", json={"username": "erin-b"}, headers={"x-api-key": fresh["apiKey"]}
        )
        assert renamed.status_code == 200
        clock = await mongo_client[app_settings.app_db].counters.find_one({"_id": "name_clock"})
        # Started at the old highest renameSeq (2); 4 names re-asserted; 2 assignments since.
        assert clock["value"] == 2 + 4 + 2

        async def renamed_in_telemetry() -> bool:
            response = await telemetry.get("/v1/stats", params={"username": "erin-b"})
            return response.status_code == 200

        await eventually(renamed_in_telemetry, within=30, interval=0.2)
        old_refresh = await runtime.refreshes.collection.find_one({"schemaVersion": 1})
        assert (old_refresh["status"], "supersededAt" in old_refresh) == ("done", True)

        async def quiet() -> bool:
            report = await verify(runtime.db, runtime.bus)
            busy = await runtime.bus.swamp_club_events.count_documents(
                {"status": {"$in": ["pending", "active"]}}
            )
            return report.clean and not busy

        await eventually(quiet, within=30, interval=0.2)
