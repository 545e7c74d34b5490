"""Both services together, workers running, talking only through the two queues."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from swamp_app.main import create_app as create_main_app
from swamp_app.settings import AppSettings
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.projection.verify import find_drift
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client, eventually
from tests.telemetry.conftest import cli_event

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
        telemetry_settings.model_copy(update={**FAST, "command_poll_interval_seconds": 0.2})
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
