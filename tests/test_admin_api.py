"""Both services' /admin endpoints: the ADMIN_TOKEN guard, the queue each consumes (stats, dead
letters, retry), telemetry's backfill state and the app's user deletion."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from swamp_app.main import create_app as create_main_app
from swamp_app.scores.consumer import score_refresh_consumer
from swamp_app.settings import AppSettings
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.main import create_app as create_telemetry_app
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client

TOKEN = "tR9kV2qW7xL4mN8pZ3cB6yH1jF5gD0sA"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Service:
    http: httpx.AsyncClient
    app: FastAPI
    queue: str


def build(
    which: str, telemetry: TelemetrySettings, main: AppSettings, token: str | None
) -> tuple[FastAPI, str]:
    secret = {"admin_token": SecretStr(token) if token else None}
    if which == "telemetry":
        settings = telemetry.model_copy(update={"run_workers": False, **secret})
        return create_telemetry_app(settings), TELEMETRY_COMMANDS
    return create_main_app(main.model_copy(update={"run_workers": False, **secret})), (
        SWAMP_CLUB_EVENTS
    )


@pytest.fixture(params=["telemetry", "app"])
async def service(
    request: pytest.FixtureRequest, telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> AsyncIterator[Service]:
    application, queue = build(request.param, telemetry_settings, app_settings, TOKEN)
    async with asgi_client(application) as http:
        yield Service(http, application, queue)


@pytest.mark.parametrize("which", ["telemetry", "app"])
async def test_without_admin_token_the_admin_api_is_off(
    which: str, telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> None:
    application, queue = build(which, telemetry_settings, app_settings, None)
    async with asgi_client(application) as http:
        response = await http.get(f"/admin/queues/{queue}", headers=ADMIN)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"x-api-key": TOKEN},
    ],
)
async def test_a_missing_or_wrong_admin_token_is_401(
    service: Service, headers: dict[str, str]
) -> None:
    response = await service.http.get(f"/admin/queues/{service.queue}", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_dead_letters_are_listed_and_retried_over_http(service: Service) -> None:
    runtime = service.app.state.runtime
    collection = runtime.client[runtime.settings.bus_db][service.queue]
    now = datetime.now(UTC)
    garbage: dict[str, Any] = {"type": "nonsense", "status": "pending", "availableAt": now}
    await collection.insert_one({**garbage, "createdAt": now, "attempts": 0, "maxAttempts": 3})
    await queue_of(service).drain()

    stats = (await service.http.get(f"/admin/queues/{service.queue}", headers=ADMIN)).json()
    assert (stats["queue"], stats["dead"]) == (service.queue, 1)
    dead = (await service.http.get(f"/admin/queues/{service.queue}/dead", headers=ADMIN)).json()
    assert [d["type"] for d in dead] == ["nonsense"]
    assert "nonsense" in dead[0]["lastError"]["message"]
    none = await service.http.get(
        f"/admin/queues/{service.queue}/dead", params={"type": "other"}, headers=ADMIN
    )
    assert none.json() == []

    retried = await service.http.post(
        f"/admin/queues/{service.queue}/dead/retry", json={"ids": [dead[0]["id"]]}, headers=ADMIN
    )

    assert retried.json() == {"retried": 1}
    stats = (await service.http.get(f"/admin/queues/{service.queue}", headers=ADMIN)).json()
    assert (stats["byStatus"]["pending"], stats["dead"]) == (1, 0)
    bad = await service.http.post(
        f"/admin/queues/{service.queue}/dead/retry", json={"ids": "all"}, headers=ADMIN
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["loc"] == "body.ids"


def queue_of(service: Service) -> Any:
    runtime = service.app.state.runtime
    if service.queue == SWAMP_CLUB_EVENTS:
        return score_refresh_consumer(runtime)
    return command_consumer(runtime)


async def test_telemetry_reports_the_backfill_state(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> None:
    application, _ = build("telemetry", telemetry_settings, app_settings, TOKEN)
    async with asgi_client(application) as http:
        response = await http.get("/admin/backfill", headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["status"] == "pending"  # the workers (and so the backfill) are off


async def test_an_operator_deletes_a_user_by_name(
    telemetry_settings: TelemetrySettings, app_settings: AppSettings
) -> None:
    application, _ = build("app", telemetry_settings, app_settings, TOKEN)
    async with asgi_client(application) as http:
        user = (await http.post("/v1/users", json={"username": "spammer"})).json()
        assert (await http.delete("/admin/users/spammer")).status_code == 401
        assert (await http.delete("/admin/users/spammer", headers=ADMIN)).status_code == 204
        assert (await http.delete("/admin/users/spammer", headers=ADMIN)).status_code == 404
        assert (await http.delete("/admin/users/No_Such", headers=ADMIN)).status_code == 422
        whoami = await http.get("/api/whoami", headers={"x-api-key": user["apiKey"]})
        assert whoami.status_code == 401


async def test_the_admin_token_never_reaches_the_logs(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        await service.http.get(f"/admin/queues/{service.queue}", headers=ADMIN)
        await service.http.get(
            f"/admin/queues/{service.queue}", headers={"Authorization": f"Bearer {TOKEN}x"}
        )
    assert caplog.records  # the request was logged ...
    assert all(TOKEN not in record.getMessage() for record in caplog.records)  # ... not the token


async def test_more_than_1000_ids_to_retry_is_422_not_a_schema_limit(service: Service) -> None:
    """The limit is enforced (422, naming the field) but not written as maxItems: a longer list
    may also be a 413 at the app's body limit, which a schema violation must not be."""
    ids = [f"{n:024x}" for n in range(1001)]
    response = await service.http.post(
        f"/admin/queues/{service.queue}/dead/retry", json={"ids": ids}, headers=ADMIN
    )
    assert response.status_code == 422
    assert "ids" in response.json()["error"]["details"][0]["loc"]
    schema = (await service.http.get("/openapi.json")).json()
    assert "maxItems" not in str(schema["components"]["schemas"]["RetryRequest"])
