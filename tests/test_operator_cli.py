"""The operator's commands find the database `make run` started, fail in one line otherwise,
and refuse malformed ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swamp_club.embedded_db import free_port
from tests.test_cli_up import start_up, wait_ready

EXECUTABLE = str(Path(sys.executable).parent / "swamp-club")


def swamp_club(*args: str, **env: str) -> tuple[int, str, str, float]:
    """Run the CLI with MONGODB_URI unset unless given; (exit code, stdout, stderr, seconds)."""
    environment = {
        k: v for k, v in os.environ.items() if k not in ("MONGODB_URI", "SWAMP_DATA_DIR")
    }
    started = time.monotonic()
    done = subprocess.run(
        [EXECUTABLE, *args],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


@pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")), reason="finds the embedded database of a running up"
)
def test_the_operator_commands_find_the_embedded_database_of_a_running_up(
    tmp_path: Path,
) -> None:
    ports = {"telemetry": free_port(), "app": free_port(), "db": free_port()}
    up = start_up(tmp_path, ports)
    try:
        wait_ready(f"http://127.0.0.1:{ports['telemetry']}/readyz", up)
        data = {"SWAMP_DATA_DIR": str(tmp_path)}
        code, out, err, _ = swamp_club("queue", "stats", "--json", **data)
        assert code == 0, err
        assert {q["queue"] for q in json.loads(out)} == {"swamp_club_events", "telemetry_commands"}
        code, out, err, _ = swamp_club("telemetry", "backfill", "--status", **data)
        assert code == 0, err
        assert json.loads(out)["status"] == "done"
        code, out, err, _ = swamp_club("telemetry", "verify", **data)
        assert (code, out.splitlines()[0]) == (0, "no drift"), err
    finally:
        up.stop()
    # Once it stopped, the state it left is not trusted: one line, exit 3.
    code, out, err, _ = swamp_club("queue", "stats", SWAMP_DATA_DIR=str(tmp_path))
    assert code == 3
    assert err.strip().count("\n") == 0, err
    assert "has stopped" in err or "no swamp-club up is running" in err


@pytest.mark.parametrize(
    "command",
    [("queue", "stats"), ("telemetry", "verify"), ("telemetry", "backfill", "--status")],
)
def test_without_a_database_the_commands_fail_in_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    code, out, err, _ = swamp_club(*command, SWAMP_DATA_DIR=str(tmp_path))
    assert code == 3, (out, err)
    assert err.strip().count("\n") == 0, err
    assert err.startswith("error: MONGODB_URI is unset and no swamp-club up is running")

    closed = f"mongodb://127.0.0.1:{free_port()}/"
    code, out, err, took = swamp_club(*command, MONGODB_URI=closed)
    assert code == 3, (out, err)
    assert err.strip().count("\n") == 0, err
    assert err.startswith("error: database unavailable (ServerSelectionTimeoutError")
    assert took < 15  # a 3 s server selection, plus the interpreter's start


def test_retry_refuses_a_malformed_id(mongo_uri: str) -> None:
    code, out, err, _ = swamp_club("queue", "retry", "notanid", MONGODB_URI=mongo_uri)
    assert code == 2, (out, err)
    assert err.strip() == "error: not a message id: 'notanid' (24 hex digits)"
