"""The telemetry app in-process with its workers off, so tests drive them step by step."""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from shared_contracts.keys import api_key_hash as key_hash
from shared_contracts.messages import ApiKeyIssued, UsernameChanged, UserRegistered
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.main import create_app
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings
from tests.support import asgi_client

#: The single anonymous event of ../shared/cli-events.md, as the real CLI sends it.
CLI_EVENT: dict[str, Any] = {
    "event": "cli_invocation",
    "distinct_id": "0b6f1c52-8a1e-4f0e-9d0a-2f4f5d6b7c81",
    "insert_id": "6a2d0c1e-3b4f-4e5a-8c9d-0e1f2a3b4c5d",
    "properties": {
        "id": "6a2d0c1e-3b4f-4e5a-8c9d-0e1f2a3b4c5d",
        "invocation": {
            "command": "model",
            "args": ["<REDACTED>"],
            "optionKeys": ["--json"],
            "globalOptions": [],
            "subcommand": "create",
        },
        "result": {
            "status": "error",
            "exitCode": 1,
            "errorType": "ValidationError",
            "errorMessage": "Missing required field: name",
        },
        "startedAt": "2026-09-14T08:01:02.003Z",
        "completedAt": "2026-09-14T08:01:02.450Z",
        "durationMs": 447,
        "swampVersion": "20260901.101500.0-sha.1a2b3c4d",
        "denoVersion": "2.8.1",
        "platform": "linux",
        "invocationContext": {
            "agentSessionDetected": False,
            "isInteractive": True,
            "externalDatastoreConfigured": False,
        },
        "$repo_id": "5e4d3c2b-1a09-4f8e-a7d6-c5b4a3928170",
    },
}


def cli_event(
    device: str,
    *,
    event_id: str | None = None,
    status: str = "success",
    command: str = "model",
    started_at: str = "2026-09-14T08:01:02.003Z",
    insert_id: bool = True,
) -> dict[str, Any]:
    event = copy.deepcopy(CLI_EVENT)
    event_id = event_id or str(uuid.uuid4())
    event["distinct_id"] = device
    event["properties"]["id"] = event_id
    event["properties"]["result"] = {"status": status, "exitCode": 0 if status == "success" else 1}
    event["properties"]["invocation"]["command"] = command
    event["properties"]["startedAt"] = started_at
    if insert_id:
        event["insert_id"] = event_id
    else:
        event.pop("insert_id")
    return event


#: The operator's token in these tests: device ids and device stats are shown only with it (or
#: with the owner's key).
ADMIN_TOKEN = "tests-admin-token-0123456789-abcdefghijklmnopqrstuvwxyz"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Telemetry:
    http: httpx.AsyncClient
    runtime: TelemetryRuntime
    watcher: IngestWatcher
    #: The app's name clock as these tests play the app: every assignment takes the next value.
    clock: int = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    async def post(self, body: Any, key: str | None = None, **headers: str) -> httpx.Response:
        if key is not None:
            headers["x-api-key"] = key
        return await self.http.post("/ingest", json=body, headers=headers)

    async def register(
        self, username: str, *, user_id: str | None = None, drain: bool = True
    ) -> tuple[str, str]:
        """A user as the app would create it: user_registered + api_key_issued commands."""
        user_id = user_id or uuid.uuid4().hex
        key = f"swamp_{uuid.uuid4().hex}"
        await self.runtime.commands.publish(
            UserRegistered(userId=user_id, username=username, seq=self.tick())
        )
        await self.runtime.commands.publish(ApiKeyIssued(userId=user_id, keyHash=key_hash(key)))
        if drain:
            await self.drain()
        return user_id, key

    def renamed(self, user_id: str, old: str, new: str, seq: int | None = None) -> UsernameChanged:
        """The command the app publishes for a rename (the next clock value unless given)."""
        return UsernameChanged(
            oldUsername=old, newUsername=new, userId=user_id, seq=seq or self.tick()
        )

    async def rename(self, user_id: str, old: str, new: str, seq: int | None = None) -> None:
        await self.runtime.commands.publish(self.renamed(user_id, old, new, seq))
        await self.drain()

    async def drain(self) -> None:
        """Apply everything pending: commands, then event batches."""
        await command_consumer(self.runtime).drain()
        await self.watcher.drain()

    async def stats(self, username: str) -> dict[str, Any]:
        """As an operator sees them (with the device ids)."""
        response = await self.http.get("/v1/stats", params={"username": username}, headers=ADMIN)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def device(self, distinct_id: str) -> httpx.Response:
        """One device's buckets, as an operator sees them."""
        return await self.http.get("/v1/stats", params={"distinct_id": distinct_id}, headers=ADMIN)

    async def stats_status(self, username: str) -> int:
        response = await self.http.get("/v1/stats", params={"username": username})
        return response.status_code

    async def refreshes(self, user_id: str) -> list[dict[str, Any]]:
        collection = self.runtime.refreshes.collection
        return await collection.find({"userId": user_id}).sort("projectionVersion").to_list()


@pytest.fixture
async def telemetry(telemetry_settings: TelemetrySettings) -> AsyncIterator[Telemetry]:
    settings = telemetry_settings.model_copy(
        update={
            "run_workers": False,
            "ingest_batch_size": 100,
            "ingest_lease_seconds": 30,
            "admin_token": SecretStr(ADMIN_TOKEN),
        }
    )
    app = create_app(settings)
    async with asgi_client(app) as http:
        runtime: TelemetryRuntime = app.state.runtime
        yield Telemetry(http=http, runtime=runtime, watcher=IngestWatcher(runtime))


@contextlib.asynccontextmanager
async def another_replica(telemetry: Telemetry) -> AsyncIterator[Telemetry]:
    """A second telemetry process on the same databases: its own client, writer and watcher."""
    app = create_app(telemetry.runtime.settings)
    async with asgi_client(app) as http:
        runtime: TelemetryRuntime = app.state.runtime
        yield Telemetry(http=http, runtime=runtime, watcher=IngestWatcher(runtime))
