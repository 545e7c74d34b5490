"""One JSON access line per request, with its request id, under `serve` and `up`; nothing of
uvicorn's plain-text access log on stdout; the request id travels on the messages it publishes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared_contracts.observability import configure_logging
from swamp_app.main import create_app as create_main_app
from swamp_app.runtime import AppRuntime
from swamp_app.settings import AppSettings
from swamp_club.embedded_db import free_port
from tests.support import DbNames, asgi_client
from tests.test_cli_up import start_up, wait_ready

EXECUTABLE = str(Path(sys.executable).parent / "swamp-club")


def access_lines(text: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "swamp.access"]


def test_serve_writes_one_json_access_line_per_request_and_nothing_on_stdout(
    tmp_path: Path, mongo_uri: str, db_names: DbNames
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MONGODB_URI": mongo_uri,
        "TELEMETRY_DB": db_names.telemetry,
        "BUS_DB": db_names.bus,
        "TELEMETRY_PORT": str(port),
        "TELEMETRY_RUN_WORKERS": "false",
    }
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        serve = subprocess.Popen(
            [EXECUTABLE, "telemetry", "serve"], env=env, stdout=out, stderr=err
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", serve)  # type: ignore[arg-type]
        response = httpx.get(
            f"http://127.0.0.1:{port}/v1/stats",
            params={"username": "nobody"},
            headers={"x-request-id": "serve-req-1"},
        )
        assert response.status_code == 404
    finally:
        serve.send_signal(2)
        serve.wait(timeout=60)
    assert serve.returncode == 0, stderr.read_text()
    assert "HTTP/1.1" not in stdout.read_text()  # uvicorn's access format
    mine = [
        line for line in access_lines(stderr.read_text()) if line["request_id"] == "serve-req-1"
    ]
    assert len(mine) == 1, stderr.read_text()
    assert (mine[0]["route"], mine[0]["status"], mine[0]["service"]) == (
        "/v1/stats",
        404,
        "telemetry",
    )
    assert "nobody" not in mine[0]["message"]  # the path only, never the query string


@pytest.mark.skipif(bool(os.environ.get("MONGODB_URI")), reason="starts the embedded database")
def test_up_writes_json_access_lines_for_both_services(tmp_path: Path) -> None:
    ports = {"telemetry": free_port(), "app": free_port(), "db": free_port()}
    up = start_up(tmp_path, ports)
    try:
        wait_ready(f"http://127.0.0.1:{ports['app']}/readyz", up)
        for service in ("telemetry", "app"):
            url = f"http://127.0.0.1:{ports[service]}/healthz"
            assert httpx.get(url, headers={"x-request-id": f"up-{service}"}).status_code == 200
    finally:
        output = up.stop()
    lines = {line["request_id"]: line for line in access_lines(output)}
    assert lines["up-telemetry"]["service"] == "telemetry"
    assert lines["up-app"]["service"] == "app"


async def test_the_request_id_travels_on_the_messages_a_request_publishes(
    app_settings: AppSettings,
) -> None:
    app = create_main_app(app_settings.model_copy(update={"run_workers": False}))
    async with asgi_client(app) as http:
        response = await http.post(
            "/v1/users", json={"username": "traced"}, headers={"x-request-id": "trace-me"}
        )
        assert response.status_code == 201
        runtime: AppRuntime = app.state.runtime
        published = await runtime.commands.collection.find().to_list()
    assert {m["type"] for m in published} == {"user_registered", "api_key_issued"}
    assert {m["requestId"] for m in published} == {"trace-me"}


def test_an_exception_python_cannot_raise_is_one_json_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seen in `up` with the database killed: a task still waiting on the driver's lock when
    the loop closed raised in its coroutine's close; the interpreter printed a raw traceback."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    configure_logging()

    class ClosesBadly:
        def __del__(self) -> None:
            raise RuntimeError("Lock is not acquired")

    ClosesBadly()  # collected at once: its exception cannot be raised anywhere
    lines = capsys.readouterr().err.splitlines()
    assert not [line for line in lines if not line.startswith("{")], lines
    (logged,) = [json.loads(line) for line in lines]
    assert logged["level"] == "error"
    assert logged["logger"] == "swamp.unraisable"
    assert "RuntimeError: Lock is not acquired" in logged["exception"]
