"""The main app in-process with its worker off, so tests apply refreshes step by step."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from swamp_app.main import create_app
from swamp_app.runtime import AppRuntime
from swamp_app.scores.consumer import score_refresh_consumer
from swamp_app.settings import AppSettings
from tests.support import asgi_client


@dataclass
class App:
    http: httpx.AsyncClient
    runtime: AppRuntime

    async def register(self, username: str) -> dict[str, Any]:
        response = await self.http.post("/v1/users", json={"username": username})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def rename(self, key: str, username: str) -> httpx.Response:
        return await self.http.patch(
            "/v1/users/me", json={"username": username}, headers={"Authorization": f"Bearer {key}"}
        )

    async def commands(self, type_: str | None = None) -> list[dict[str, Any]]:
        query = {"type": type_} if type_ else {}
        return await self.runtime.commands.collection.find(query).sort("orderSeq").to_list()

    async def apply_refreshes(self) -> int:
        return await score_refresh_consumer(self.runtime).drain()

    async def score(self, username: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/users/{username}/score")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
async def app(app_settings: AppSettings) -> AsyncIterator[App]:
    settings = app_settings.model_copy(update={"run_workers": False, "score_history_cap": 3})
    application = create_app(settings)
    async with asgi_client(application) as http:
        yield App(http=http, runtime=application.state.runtime)
