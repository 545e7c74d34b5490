"""Both services in-process with their workers off: a test moves every message by hand.

``drain()`` runs telemetry's command consumer, its ingest watcher and the app's score consumer
until none of them finds work, so a test decides exactly what has been applied when, and can
hold back, dead-letter or retry single commands in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from shared_contracts import mongo
from shared_contracts.queue.admin import retry_dead
from swamp_app.main import create_app as create_main_app
from swamp_app.runtime import AppRuntime
from swamp_app.scores.consumer import score_refresh_consumer
from swamp_app.settings import AppSettings
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client
from tests.telemetry.conftest import cli_event

#: Far enough in the future that a held command is never claimed until released.
HELD = datetime(9000, 1, 1, tzinfo=UTC)


@dataclass
class Pipeline:
    app: httpx.AsyncClient
    telemetry: httpx.AsyncClient
    app_runtime: AppRuntime
    telemetry_runtime: TelemetryRuntime

    # --- the app, as its users call it ---------------------------------------------------

    async def register(self, username: str) -> dict[str, Any]:
        response = await self.app.post("/v1/users", json={"username": username})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def rename(self, key: str, username: str) -> httpx.Response:
        return await self.app.patch(
            "/v1/users/me", json={"username": username}, headers={"x-api-key": key}
        )

    async def new_key(self, key: str) -> dict[str, Any]:
        response = await self.app.post("/v1/users/me/api-keys", headers={"x-api-key": key})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def revoke(self, key: str, key_id: str) -> None:
        response = await self.app.delete(
            f"/v1/users/me/api-keys/{key_id}", headers={"x-api-key": key}
        )
        assert response.status_code == 204, response.text

    async def delete(self, key: str) -> None:
        response = await self.app.delete("/v1/users/me", headers={"x-api-key": key})
        assert response.status_code == 204, response.text

    # --- the CLI --------------------------------------------------------------------------

    async def send(
        self, device: str, key: str | None = None, *, count: int = 1, started_at: str | None = None
    ) -> None:
        extra = {"started_at": started_at} if started_at else {}
        events = [cli_event(device, **extra) for _ in range(count)]
        body: Any = events[0] if count == 1 else {"events": events}
        headers = {"x-api-key": key} if key else {}
        response = await self.telemetry.post("/ingest", json=body, headers=headers)
        assert response.status_code == 202, response.text

    # --- reading ----------------------------------------------------------------------------

    async def stats(self, username: str) -> dict[str, Any] | None:
        response = await self.telemetry.get("/v1/stats", params={"username": username})
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def score(self, username: str) -> dict[str, Any] | None:
        response = await self.app.get(f"/v1/users/{username}/score")
        if response.status_code == 404:
            return None
        body: dict[str, Any] = response.json()
        return body

    async def projection(self, user_id: str) -> dict[str, Any] | None:
        return await self.telemetry_runtime.db.username_metrics.find_one({"_id": user_id})

    async def stored_score(self, user_id: str) -> dict[str, Any] | None:
        return await self.app_runtime.db.user_scores.find_one({"_id": user_id})

    # --- moving messages --------------------------------------------------------------------

    async def drain(self) -> None:
        while True:
            moved = await command_consumer(self.telemetry_runtime).drain()
            moved += await IngestWatcher(self.telemetry_runtime).drain()
            moved += await score_refresh_consumer(self.app_runtime).drain()
            if not moved:
                return

    async def hold_commands(self, **match: Any) -> int:
        """Park pending commands matching ``match`` (e.g. type, userId) until released."""
        result = await mongo.update_many(
            self.commands,
            {"status": "pending", **match},
            {"$set": {"availableAt": HELD, "held": True}},
        )
        return result.modified_count

    async def release_commands(self) -> None:
        await mongo.update_many(
            self.commands,
            {"held": True},
            {
                "$set": {"availableAt": datetime.now(UTC) - timedelta(seconds=1)},
                "$unset": {"held": ""},
            },
        )

    async def dead_letter_commands(self, **match: Any) -> int:
        """As if these pending commands had failed every attempt."""
        query = {"status": "pending", **match}
        doomed = await self.commands.find(query, {"orderingKey": 1}).to_list()
        await mongo.update_many(
            self.commands,
            {"_id": {"$in": [d["_id"] for d in doomed]}},
            {"$set": {"status": "dead", "lastError": {"type": "Test", "message": "killed"}}},
        )
        for key in {d["orderingKey"] for d in doomed if d.get("orderingKey")}:
            await self.telemetry_runtime.commands.promote(key)  # as the engine's dead_letter does
        return len(doomed)

    async def retry_dead_commands(self) -> int:
        return await retry_dead(self.commands, ids=None, now=datetime.now(UTC))

    @property
    def commands(self) -> Any:
        return self.telemetry_runtime.commands.collection


@contextlib.asynccontextmanager
async def pipeline_of(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> AsyncIterator[Pipeline]:
    telemetry_app = create_telemetry_app(
        telemetry_settings.model_copy(update={"run_workers": False})
    )
    main_app = create_main_app(app_settings.model_copy(update={"run_workers": False}))
    async with asgi_client(telemetry_app) as telemetry, asgi_client(main_app) as app:
        yield Pipeline(app, telemetry, main_app.state.runtime, telemetry_app.state.runtime)
