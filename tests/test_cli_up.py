"""`swamp-club up` (what `make run` calls) as a real process: starts, serves, stops, restarts."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest
from pymongo import MongoClient

from swamp_club.embedded_db import free_port
from tests.support import LoggedProcess

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")), reason="exercises the embedded database launcher"
)


def start_up(
    data_dir: Path, ports: dict[str, int], *, new_session: bool = False, log: str = "up.log"
) -> LoggedProcess:
    env = {
        **os.environ,
        "SWAMP_DATA_DIR": str(data_dir),
        "TELEMETRY_PORT": str(ports["telemetry"]),
        "APP_PORT": str(ports["app"]),
        "EMBEDDED_DB_PORT": str(ports["db"]),
    }
    env.pop("MONGODB_URI", None)
    executable = Path(sys.executable).parent / "swamp-club"
    return LoggedProcess(
        [str(executable), "up"], env=env, log=data_dir / log, new_session=new_session
    )


def wait_ready(url: str, process: LoggedProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.output()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout}s")


def test_up_serves_both_services_and_keeps_its_data(tmp_path: Path) -> None:
    ports = {"telemetry": free_port(), "app": free_port(), "db": free_port()}
    process = start_up(tmp_path, ports)
    try:
        wait_ready(f"http://127.0.0.1:{ports['telemetry']}/readyz", process)
        wait_ready(f"http://127.0.0.1:{ports['app']}/readyz", process)
        with MongoClient(f"mongodb://127.0.0.1:{ports['db']}/") as client:
            client.persisted.marker.insert_one({"_id": "kept"})
    finally:
        output = process.stop()
    assert f"http://127.0.0.1:{ports['telemetry']}" in output
    assert "embedded database ready" in output

    process = start_up(tmp_path, ports)  # a second `up` finds its data again
    try:
        wait_ready(f"http://127.0.0.1:{ports['app']}/readyz", process)
        with MongoClient(f"mongodb://127.0.0.1:{ports['db']}/") as client:
            assert client.persisted.marker.find_one({"_id": "kept"}) == {"_id": "kept"}
    finally:
        process.stop()


def test_up_reports_a_clear_error_when_the_database_cannot_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = start_up(tmp_path, {"telemetry": free_port(), "app": free_port(), "db": port})
        process.wait(timeout=90)
    assert process.returncode == 2
    assert "error:" in process.output()
