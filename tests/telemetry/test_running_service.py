"""The service as deployed: workers inside the app, and the operator's verify command."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from shared_contracts.keys import api_key_hash as key_hash
from shared_contracts.messages import ApiKeyIssued, UserRegistered
from telemetry_service.collections import USERNAME_METRICS
from telemetry_service.main import create_app
from telemetry_service.runtime import TelemetryRuntime
from telemetry_service.settings import TelemetrySettings
from tests.support import DbNames, asgi_client, eventually
from tests.telemetry.conftest import cli_event


async def test_workers_in_the_app_apply_commands_and_events_on_their_own(
    telemetry_settings: TelemetrySettings,
) -> None:
    app = create_app(telemetry_settings.model_copy(update={"queue_poll_interval_seconds": 30}))
    async with asgi_client(app) as http:
        runtime: TelemetryRuntime = app.state.runtime
        key = "swamp_in-app-workers"
        await runtime.commands.publish(UserRegistered(userId="u-42", username="nora"))
        await runtime.commands.publish(ApiKeyIssued(userId="u-42", keyHash=key_hash(key)))

        async def key_known() -> bool:
            response = await http.post("/ingest", json=cli_event("n1"), headers={"x-api-key": key})
            return response.status_code == 202

        await eventually(key_known, within=30, interval=0.2)

        async def counted() -> bool:
            response = await http.get("/v1/stats", params={"username": "nora"})
            return response.status_code == 200 and response.json()["totalInvocations"] == 1

        await eventually(counted, within=30)


async def swamp_club(env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "swamp-club"),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_verify_exits_1_on_drift_and_0_without(
    telemetry_settings: TelemetrySettings, mongo_uri: str, db_names: DbNames
) -> None:
    env = {"MONGODB_URI": mongo_uri, "TELEMETRY_DB": db_names.telemetry, "BUS_DB": db_names.bus}
    app = create_app(telemetry_settings.model_copy(update={"run_workers": False}))
    async with asgi_client(app):
        runtime: TelemetryRuntime = app.state.runtime
        from telemetry_service.consumers.commands import command_consumer

        await runtime.commands.publish(UserRegistered(userId="u-7", username="olga", seq=1))
        await command_consumer(runtime).drain()
        code, output = await swamp_club(env, "telemetry", "verify")
        assert (code, output.splitlines()[0]) == (0, "no drift"), output
        await runtime.db[USERNAME_METRICS].update_one(
            {"_id": "u-7"}, {"$set": {"totalInvocations": 5}}
        )
        code, output = await swamp_club(env, "telemetry", "verify")
    assert code == 1
    assert "u-7: projection differs from the fold (totalInvocations)" in output
