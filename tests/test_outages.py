"""The database dies under a running `swamp-club up`: every answer is a prompt 503 in our error
shape with Retry-After, /readyz answers within 2 s, and Ctrl-C still stops it within bounds."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from swamp_club.embedded_db import EmbeddedDb, free_port
from tests.support import LoggedProcess
from tests.telemetry.conftest import cli_event
from tests.test_cli_up import wait_ready

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")), reason="kills a database of its own (embedded)"
)

#: The request's database budget (REQUEST_DB_TIMEOUT_SECONDS, 10 s by default, lower here to
#: keep the test short) bounds every answer: the driver retries retryable reads and writes, and
#: with_transaction its transactions, until that budget is spent, then we answer 503.
REQUEST_BUDGET_SECONDS = 4.0
DRIVER_WORDS = ("pymongo", "Topology", "ServerSelection", "localhost:", "127.0.0.1:", "Errno")


def timed(request: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = request()
    return response, time.monotonic() - started


def assert_outage(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "database_unavailable"
    assert not any(word in response.text for word in DRIVER_WORDS), response.text


def test_a_dead_database_is_a_prompt_503_and_ctrl_c_still_stops(tmp_path: Path) -> None:
    db = EmbeddedDb(log_path=tmp_path / "db.log")
    db.start()
    ports = {"telemetry": free_port(), "app": free_port()}
    env = {
        **os.environ,
        "MONGODB_URI": db.uri,
        "TELEMETRY_PORT": str(ports["telemetry"]),
        "APP_PORT": str(ports["app"]),
        "REQUEST_DB_TIMEOUT_SECONDS": str(REQUEST_BUDGET_SECONDS),
    }
    up = LoggedProcess(
        [str(Path(sys.executable).parent / "swamp-club"), "up"], env=env, log=tmp_path / "up.log"
    )
    telemetry, app = f"http://127.0.0.1:{ports['telemetry']}", f"http://127.0.0.1:{ports['app']}"
    try:
        wait_ready(f"{telemetry}/readyz", up)
        wait_ready(f"{app}/readyz", up)
        assert httpx.post(f"{telemetry}/ingest", json=cli_event("dev")).status_code == 202

        assert db.pid is not None
        os.kill(db.pid, signal.SIGKILL)  # no goodbye: sockets reset, the port closed

        with httpx.Client(timeout=60) as http:
            for url in (f"{telemetry}/readyz", f"{app}/readyz"):
                response, took = timed(lambda url=url: http.get(url))
                print(f"readyz with the database down: {took:.2f}s")
                assert_outage(response)
                assert took < 2.0
            ingest, took = timed(lambda: http.post(f"{telemetry}/ingest", json=cli_event("dev")))
            print(f"POST /ingest with the database down: {took:.2f}s")
            assert_outage(ingest)
            assert took < REQUEST_BUDGET_SECONDS + 2
            # A transaction: with_transaction retries transient errors, within the request budget.
            register, took = timed(lambda: http.post(f"{app}/v1/users", json={"username": "down"}))
            print(f"POST /v1/users (a transaction) with the database down: {took:.2f}s")
            assert_outage(register)
            assert took < REQUEST_BUDGET_SECONDS + 2
            stats, took = timed(lambda: http.get(f"{telemetry}/v1/stats?username=down"))
            assert_outage(stats)
            assert took < REQUEST_BUDGET_SECONDS + 2

        started = time.monotonic()
        up.send_signal(signal.SIGINT)
        up.wait(timeout=90)
        took = time.monotonic() - started
        print(f"Ctrl-C with the database down: exited in {took:.1f}s")
        assert up.returncode == 0, up.output()
        assert took < 30, up.output()
        # Nothing escaped as a raw traceback (logged errors are JSON lines, one per line).
        lines = up.output(tail=10**9).splitlines()
        assert not [line for line in lines if line.startswith("Traceback")], lines
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        db.stop()
