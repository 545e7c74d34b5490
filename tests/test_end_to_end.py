"""The whole system as `make run` starts it: real processes, HTTP only, stop and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from swamp_club.embedded_db import free_port
from tests.telemetry.conftest import cli_event
from tests.test_cli_up import start_up, wait_ready

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")), reason="starts the embedded database through `up`"
)
FAST = {
    "QUEUE_POLL_INTERVAL_SECONDS": "0.2",
    "INGEST_POLL_INTERVAL_SECONDS": "0.2",
    "COMMAND_POLL_INTERVAL_SECONDS": "0.5",
}


def wait_for(probe: Callable[[], Any], within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {within}s")


class Running:
    def __init__(self, data_dir: Path, ports: dict[str, int]) -> None:
        os.environ.update(FAST)
        try:
            self.process = start_up(data_dir, ports)
        finally:
            for name in FAST:
                os.environ.pop(name, None)
        self.telemetry = f"http://127.0.0.1:{ports['telemetry']}"
        self.app = f"http://127.0.0.1:{ports['app']}"
        wait_ready(f"{self.telemetry}/readyz", self.process)
        wait_ready(f"{self.app}/readyz", self.process)

    def stats(self, username: str) -> httpx.Response:
        return httpx.get(f"{self.telemetry}/v1/stats", params={"username": username})

    def score(self, username: str) -> dict[str, Any] | None:
        response = httpx.get(f"{self.app}/v1/users/{username}/score")
        return response.json() if response.status_code == 200 else None

    def ingest(self, body: Any, key: str | None = None) -> httpx.Response:
        headers = {"x-api-key": key} if key else {}
        return httpx.post(f"{self.telemetry}/ingest", json=body, headers=headers, timeout=30)


def test_the_whole_story_over_http_survives_a_restart(tmp_path: Path) -> None:
    ports = {"telemetry": free_port(), "app": free_port(), "db": free_port()}
    system = Running(tmp_path, ports)
    try:
        user = httpx.post(f"{system.app}/v1/users", json={"username": "e2e-user"}).json()
        key = user["apiKey"]
        assert (
            system.ingest({"events": [cli_event("e2e-dev") for _ in range(3)]}).status_code == 202
        )
        wait_for(lambda: system.ingest(cli_event("e2e-dev"), key).status_code == 202)
        system.ingest({"events": [cli_event("e2e-dev") for _ in range(2)]}, key)
        stats = wait_for(
            lambda: (
                (r := system.stats("e2e-user")).status_code == 200
                and r.json()["totalInvocations"] == 6
                and r.json()
            )
        )

        def score_caught_up(username: str, version: int) -> dict[str, Any] | None:
            score = system.score(username)
            return score if score and score["sourceVersion"] == version else None

        score = wait_for(lambda: score_caught_up("e2e-user", stats["projectionVersion"]))
        assert score["canonicalScore"] > 0
        renamed = httpx.patch(
            f"{system.app}/v1/users/me",
            json={"username": "e2e-renamed"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert renamed.status_code == 200
        new_stats = wait_for(
            lambda: (r := system.stats("e2e-renamed")).status_code == 200 and r.json()
        )
        assert new_stats["totalInvocations"] == 6
        assert system.stats("e2e-user").status_code == 404
        survived = wait_for(lambda: score_caught_up("e2e-renamed", new_stats["projectionVersion"]))
        assert survived["canonicalScore"] == score["canonicalScore"]
        metrics = httpx.get(f"{system.telemetry}/metrics").text
        for name in (
            "swamp_ingest_events_total",
            "swamp_queue_messages",
            "swamp_http_requests_total",
        ):
            assert name in metrics
        assert "swamp_refresh_lag_seconds_count" in httpx.get(f"{system.app}/metrics").text
        ready = httpx.get(f"{system.telemetry}/readyz").json()
        assert (ready["workers"], ready["backfill"]["status"]) == ("alive", "done")
    finally:
        system.process.stop()

    again = Running(tmp_path, ports)  # the same data directory
    try:
        after = again.stats("e2e-renamed").json()
        assert after["totalInvocations"] == 6
        # The backfill did not run again: it would have written a new projection version.
        assert after["projectionVersion"] == new_stats["projectionVersion"]
        assert httpx.get(f"{again.telemetry}/readyz").json()["backfill"]["status"] == "done"
        assert again.score("e2e-renamed") == survived
    finally:
        again.process.stop()


def test_sigterm_during_processing_loses_nothing(tmp_path: Path) -> None:
    ports = {"telemetry": free_port(), "app": free_port(), "db": free_port()}
    system = Running(tmp_path, ports)
    user = httpx.post(f"{system.app}/v1/users", json={"username": "sigterm-user"}).json()
    wait_for(lambda: system.ingest(cli_event("t-dev"), user["apiKey"]).status_code == 202)
    for _ in range(8):
        events = [cli_event("t-dev") for _ in range(25)]
        assert system.ingest({"events": events}, user["apiKey"]).status_code == 202
    system.process.send_signal(signal.SIGTERM)  # while the watcher is still applying batches
    system.process.wait(timeout=60)
    assert system.process.returncode == 0, system.process.output()

    again = Running(tmp_path, ports)
    try:
        wait_for(
            lambda: (
                (r := again.stats("sigterm-user")).status_code == 200
                and r.json()["totalInvocations"] == 201
            )
        )
        verify = subprocess.run(
            [str(Path(sys.executable).parent / "swamp-club"), "telemetry", "verify"],
            env={**os.environ, "MONGODB_URI": f"mongodb://127.0.0.1:{ports['db']}/"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert (verify.returncode, verify.stdout.splitlines()[0]) == (0, "no drift")
    finally:
        again.process.stop()
