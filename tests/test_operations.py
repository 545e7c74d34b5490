"""A bad day under `swamp-club up` (what `make run` calls), as real processes: Ctrl-C to the
whole process group under load, a second Ctrl-C, a second copy on the same data directory or
database port."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from swamp_club.embedded_db import free_port
from swamp_club.instance import STATE_FILE
from tests.telemetry.conftest import cli_event
from tests.test_cli_up import start_up, wait_ready
from tests.test_end_to_end import wait_for

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")), reason="exercises the embedded database launcher"
)

#: Ctrl-C under load must end `up` within this (the issue saw it hang for over 10 minutes).
EXIT_BOUND_SECONDS = 30.0


def new_ports() -> dict[str, int]:
    return {"telemetry": free_port(), "app": free_port(), "db": free_port()}


def register(app: str, telemetry: str, username: str) -> str:
    """A user whose key telemetry already accepts."""
    key: str = httpx.post(f"{app}/v1/users", json={"username": username}).json()["apiKey"]
    probe = cli_event("probe-dev")
    wait_for(
        lambda: (
            httpx.post(
                f"{telemetry}/ingest", json=probe, headers={"x-api-key": key}, timeout=30
            ).status_code
            == 202
        )
    )
    return key


class Load:
    """CLI-like clients posting batches until stopped; remembers every event answered 202."""

    def __init__(self, telemetry: str, key: str, *, clients: int = 6, batch: int = 20) -> None:
        self.telemetry, self.key, self.batch = telemetry, key, batch
        self.accepted: set[str] = set()
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                events = [cli_event("load-dev") for _ in range(self.batch)]
                with self._lock:
                    self.sent += len(events)
                try:
                    response = http.post(
                        f"{self.telemetry}/ingest",
                        json={"events": events},
                        headers={"x-api-key": self.key},
                    )
                except httpx.TransportError:
                    time.sleep(0.05)  # shutting down: the CLI would re-send later
                    continue
                if response.status_code == 202:
                    with self._lock:
                        self.accepted.update(e["insert_id"] for e in events)


def test_ctrl_c_to_the_process_group_under_load_exits_in_seconds_and_loses_nothing(
    tmp_path: Path,
) -> None:
    ports = new_ports()
    system = start_up(tmp_path, ports, new_session=True)
    telemetry, app = f"http://127.0.0.1:{ports['telemetry']}", f"http://127.0.0.1:{ports['app']}"
    try:
        wait_ready(f"{telemetry}/readyz", system)
        wait_ready(f"{app}/readyz", system)
        key = register(app, telemetry, "ctrl-c-user")
        with Load(telemetry, key) as load:
            wait_for(lambda: len(load.accepted) >= 400, within=60)
            # What a terminal does on Ctrl-C: SIGINT to every process of the foreground group.
            os.killpg(system.pid, signal.SIGINT)
            started = time.monotonic()
            system.wait(timeout=EXIT_BOUND_SECONDS + 30)
            took = time.monotonic() - started
        print(f"Ctrl-C under load: exited in {took:.1f}s, {len(load.accepted)} events accepted")
        assert system.returncode == 0, system.output()
        assert took < EXIT_BOUND_SECONDS, system.output()
    finally:
        if system.poll() is None:
            os.killpg(system.pid, signal.SIGKILL)
            system.wait()

    accepted = len(load.accepted) + 1  # and the probe that showed the key was known
    again = start_up(tmp_path, ports, new_session=True, log="again.log")
    try:
        wait_ready(f"{telemetry}/readyz", again)
        # The embedded database was stopped cleanly, last: everything accepted is there and
        # counted once, whatever the watcher was doing when the signal came.
        wait_for(
            lambda: (
                (
                    r := httpx.get(f"{telemetry}/v1/stats", params={"username": "ctrl-c-user"})
                ).status_code
                == 200
                and r.json()["totalInvocations"] >= accepted
            ),
            within=180,
        )
        time.sleep(1)  # nothing more than accepted (no event counted twice) once it settles
        stats = httpx.get(f"{telemetry}/v1/stats", params={"username": "ctrl-c-user"}).json()
        # 202-less requests may have been stored before the connection closed (the CLI would
        # re-send them): they count at most once, so the total lies within [accepted, sent].
        assert accepted <= stats["totalInvocations"] <= load.sent + 1
    finally:
        again.stop()


def test_a_second_ctrl_c_forces_the_exit_and_stops_the_database(tmp_path: Path) -> None:
    ports = new_ports()
    system = start_up(tmp_path, ports, new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{ports['app']}/readyz", system)
        db_pid = json.loads((tmp_path / STATE_FILE).read_text())["dbPid"]
        # A database that stopped answering (not gone: its sockets stay open) makes a graceful
        # drain wait on every deadline; an operator's second Ctrl-C must not.
        os.kill(db_pid, signal.SIGSTOP)
        os.killpg(system.pid, signal.SIGINT)
        time.sleep(1)
        assert system.poll() is None, "the graceful drain should still be waiting"
        started = time.monotonic()
        os.killpg(system.pid, signal.SIGINT)
        system.wait(timeout=30)
        took = time.monotonic() - started
        assert system.returncode == 130, system.output()
        assert took < 10, took
        assert "forcing exit: second interrupt" in system.output()
        with pytest.raises(ProcessLookupError):
            os.kill(db_pid, 0)  # stopped (killed, as it could not answer SIGTERM), not orphaned
    finally:
        if system.poll() is None:
            os.killpg(system.pid, signal.SIGKILL)
            system.wait()


def test_a_second_copy_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    ports = new_ports()
    first = start_up(tmp_path, ports)
    try:
        wait_ready(f"http://127.0.0.1:{ports['telemetry']}/readyz", first)
        second = start_up(tmp_path, new_ports(), log="second.log")
        second.wait(timeout=30)
        out = second.output().strip()
        assert second.returncode == 2, out
        assert out.count("\n") == 0, out
        assert out.startswith("error: data directory"), out
        assert "in use" in out, out
        # The first one is untouched and still owns its state.
        assert httpx.get(f"http://127.0.0.1:{ports['telemetry']}/readyz").status_code == 200
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert state["uri"] == f"mongodb://127.0.0.1:{ports['db']}/"
    finally:
        first.stop()


def test_a_second_copy_on_the_same_database_port_is_refused(tmp_path: Path) -> None:
    ports = new_ports()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = start_up(tmp_path / "one", ports)
    try:
        wait_ready(f"http://127.0.0.1:{ports['telemetry']}/readyz", first)
        other = {**new_ports(), "db": ports["db"]}
        second = start_up(tmp_path / "two", other)
        second.wait(timeout=30)
        out = second.output().strip()
        assert second.returncode == 2, out
        assert out.count("\n") == 0, out
        assert f"port 127.0.0.1:{ports['db']} is taken" in out, out
        assert "embedded database ready" not in out
    finally:
        first.stop()


def test_a_taken_service_port_is_refused_before_any_banner(tmp_path: Path) -> None:
    """A port another process serves: one line and exit 2, never a banner whose URL would
    point at the other process (found by trying the README on a fresh clone)."""
    import socket

    ports = new_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", ports["app"]))
        taken.listen()
        second = start_up(tmp_path, ports)
        second.wait(timeout=60)
    lines = [
        line for line in second.output().strip().splitlines() if "embedded database" not in line
    ]
    assert second.returncode == 2, second.output()
    assert lines == [
        f"error: port 127.0.0.1:{ports['app']} is taken (another swamp-club up or"
        " server?); stop it or set APP_PORT to a free port"
    ], second.output()
    assert "main app:" not in second.output()
