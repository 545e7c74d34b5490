"""Both services together, workers running, talking only through the two queues."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from shared_contracts.keys import api_key_hash
from swamp_app.main import create_app as create_main_app
from swamp_app.settings import AppSettings
from telemetry_service.identity.keys import known_keys
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.projection.verify import find_drift
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client, eventually
from tests.telemetry.conftest import ADMIN, ADMIN_TOKEN, cli_event

FAST = {"queue_poll_interval_seconds": 0.2, "ingest_poll_interval_seconds": 0.2}


@dataclass
class System:
    telemetry: httpx.AsyncClient
    app: httpx.AsyncClient
    telemetry_runtime: Any

    async def stats(self, username: str) -> httpx.Response:
        return await self.telemetry.get("/v1/stats", params={"username": username})

    async def score(self, username: str) -> dict[str, Any] | None:
        response = await self.app.get(f"/v1/users/{username}/score")
        return response.json() if response.status_code == 200 else None


@pytest.fixture
async def system(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> AsyncIterator[System]:
    telemetry_app = create_telemetry_app(
        telemetry_settings.model_copy(
            update={
                **FAST,
                "command_poll_interval_seconds": 0.2,
                "admin_token": SecretStr(ADMIN_TOKEN),
            }
        )
    )
    main_app = create_main_app(app_settings.model_copy(update=FAST))
    async with asgi_client(telemetry_app) as telemetry, asgi_client(main_app) as app:
        yield System(telemetry, app, telemetry_app.state.runtime)


async def test_register_ingest_rename_and_the_score_follows(system: System) -> None:
    user = (await system.app.post("/v1/users", json={"username": "swampy"})).json()
    key = user["apiKey"]

    async def key_known() -> bool:
        ping = await system.telemetry.post(
            "/ingest", json=cli_event("laptop"), headers={"x-api-key": key}
        )
        return ping.status_code == 202

    await eventually(key_known, within=30, interval=0.2)
    await system.telemetry.post("/ingest", json={"events": [cli_event("laptop") for _ in range(3)]})
    await system.telemetry.post(
        "/ingest",
        json={
            "events": [cli_event("laptop", started_at="2026-09-15T10:00:00.000Z") for _ in range(2)]
        },
        headers={"x-api-key": key},
    )

    async def all_counted() -> bool:
        response = await system.stats("swampy")
        return response.status_code == 200 and response.json()["totalInvocations"] == 6

    await eventually(all_counted, within=30)
    stats = (await system.stats("swampy")).json()

    async def score_applied() -> bool:
        score = await system.score("swampy")
        return score is not None and score["sourceVersion"] == stats["projectionVersion"]

    await eventually(score_applied, within=30)
    score_before = await system.score("swampy")
    assert score_before is not None
    assert score_before["canonicalScore"] > 0

    renamed = await system.app.patch(
        "/v1/users/me", json={"username": "swampier"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert renamed.status_code == 200

    async def moved() -> bool:
        return (await system.stats("swampier")).status_code == 200

    await eventually(moved, within=30)
    assert (await system.stats("swampy")).status_code == 404
    new_stats = (await system.stats("swampier")).json()
    assert new_stats["totalInvocations"] == 6

    async def refreshed_under_new_name() -> bool:
        score = await system.score("swampier")
        return score is not None and score["sourceVersion"] == new_stats["projectionVersion"]

    await eventually(refreshed_under_new_name, within=30)
    score_after = await system.score("swampier")
    assert score_after is not None
    assert score_after["canonicalScore"] == score_before["canonicalScore"]  # preserved
    assert score_after["scoreHistory"][-1]["reason"] == "identity_migration"
    board = (await system.app.get("/v1/leaderboard")).json()["entries"]
    assert [(e["username"], e["canonicalScore"]) for e in board] == [
        ("swampier", score_before["canonicalScore"])
    ]
    assert await find_drift(system.telemetry_runtime.db) == []


async def test_a_deleted_users_key_counts_as_no_key(system: System) -> None:
    """I10: never a 401 (the CLI would hold the batch for days); after the deletion the key's
    events are the device's anonymous events, never the deleted user's own."""
    user = (await system.app.post("/v1/users", json={"username": "leaver"})).json()
    headers = {"x-api-key": user["apiKey"]}
    assert (
        await system.telemetry.post("/ingest", json=cli_event("d1"), headers=headers)
    ).status_code == 202

    async def device(owner_events: int, anonymous: int) -> bool:
        response = await system.telemetry.get(
            "/v1/stats", params={"distinct_id": "d1"}, headers=ADMIN
        )
        if response.status_code != 200:
            return False
        body = response.json()
        mine = body["users"].get(user["id"], {}).get("invocations", 0)
        return (mine, body["anonymous"]["invocations"]) == (owner_events, anonymous)

    await eventually(lambda: device(1, 0), within=30)
    deleted = await system.app.delete("/v1/users/me", headers=headers)
    assert deleted.status_code == 204

    async def revoke_heard() -> bool:
        found = await known_keys(system.telemetry_runtime.db, [api_key_hash(user["apiKey"])])
        return any(key.revokedAt is not None for key in found.values())

    # A revoke is not retroactive (I10 resolves a key when its event is applied): an event the
    # watcher applies before the command consumer has read api_key_revoked still counts for the
    # user. make test failed so once, when the watcher won that race.
    await eventually(revoke_heard, within=30)
    response = await system.telemetry.post("/ingest", json=cli_event("d1"), headers=headers)
    assert response.status_code == 202
    await eventually(lambda: device(1, 1), within=30)


async def seed_dormant(mongo_client: Any, telemetry: TelemetrySettings, app: AppSettings) -> None:
    """The state #501 left behind: a projection that misses the user's anonymous history (or
    was corrected without a re-score), and a UserScore nobody will ever refresh."""
    from tests.telemetry.test_backfill import bucket

    tdb, adb = mongo_client[telemetry.telemetry_db], mongo_client[app.app_db]
    await tdb.user_metrics.insert_one(
        {"_id": "old-laptop", "ownerUserId": "uid-dormant", "anon": bucket(9), "userIds": []}
    )
    await tdb.identity_map.insert_one(
        {"_id": "uid-dormant", "username": "dormant", "distinctIds": ["old-laptop"]}
    )
    await tdb.known_users.insert_one({"_id": "uid-dormant", "username": "dormant", "nameSeq": 1})
    await tdb.username_metrics.insert_one(
        {"_id": "uid-dormant", "username": "dormant", "totalInvocations": 0, "projectionVersion": 3}
    )
    await tdb.migrations.insert_one({"_id": "identity_by_user_id", "status": "done"})
    await adb.users.insert_one({"_id": "uid-dormant", "username": "dormant", "nameSeq": 1})
    await adb.counters.insert_one({"_id": "name_clock", "value": 1})
    await adb.user_scores.insert_one(
        {
            "_id": "uid-dormant",
            "username": "dormant",
            "canonicalScore": 0.0,
            "activityScore": 0.0,
            "scoreSources": {"activity": 0.0},
            "scoreHistory": [],
            "sourceVersion": 3,
            "updatedAt": datetime.now(UTC),
        }
    )


async def test_501_dormant_active_and_on_bind_users_all_converge(
    mongo_client: Any, telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> None:
    await seed_dormant(mongo_client, telemetry_settings, app_settings)
    telemetry_app = create_telemetry_app(
        telemetry_settings.model_copy(update={**FAST, "command_poll_interval_seconds": 0.2})
    )
    main_app = create_main_app(app_settings.model_copy(update=FAST))
    async with asgi_client(telemetry_app) as telemetry, asgi_client(main_app) as app:
        system = System(telemetry, app, telemetry_app.state.runtime)
        # Active cohort: registers and sends events. On-bind cohort: anonymous history first.
        active = (await app.post("/v1/users", json={"username": "active"})).json()
        binder = (await app.post("/v1/users", json={"username": "binder"})).json()
        await telemetry.post("/ingest", json={"events": [cli_event("bind-dev") for _ in range(4)]})

        async def keys_known() -> bool:
            responses = [
                await telemetry.post("/ingest", json=cli_event(device), headers={"x-api-key": key})
                for device, key in (("act-dev", active["apiKey"]), ("bind-dev", binder["apiKey"]))
            ]
            return all(r.status_code == 202 for r in responses)

        await eventually(keys_known, within=30, interval=0.2)

        async def converged(username: str, invocations: int) -> bool:
            stats = await system.stats(username)
            if stats.status_code != 200 or stats.json()["totalInvocations"] != invocations:
                return False
            score = await system.score(username)
            return score is not None and score["sourceVersion"] == stats.json()["projectionVersion"]

        for username, invocations in (("dormant", 9), ("active", 1), ("binder", 5)):
            await eventually(lambda u=username, n=invocations: converged(u, n), within=60)

        from swamp_app.scores.scoring import canonical_score, score_sources

        dormant_stats = (await system.stats("dormant")).json()
        dormant = await system.score("dormant")
        assert dormant is not None
        assert dormant["canonicalScore"] == canonical_score(score_sources(dormant_stats)) > 0
        assert [h["reason"] for h in dormant["scoreHistory"]] == ["backfill"]
        binder_score = await system.score("binder")
        assert binder_score is not None
        assert "binding" in {h["reason"] for h in binder_score["scoreHistory"]}
        for username in ("dormant", "active", "binder"):
            score = await system.score(username)
            assert score is not None
            applied = [h["projectionVersion"] for h in score["scoreHistory"]]
            assert len(applied) == len(set(applied)), "a projection version applied twice"
        marker = await system.telemetry_runtime.db.migrations.find_one(
            {"_id": "username_metrics_backfill"}
        )
        assert marker["status"] == "done"
        assert await find_drift(system.telemetry_runtime.db) == []
