"""docker-compose.yml agrees with the settings, and docker-compose itself accepts it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from swamp_app.settings import AppSettings
from swamp_club.servers import SHUTDOWN_DEADLINE_SECONDS
from telemetry_service.settings import TelemetrySettings

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("MONGO_ROOT_PASSWORD", "TELEMETRY_DB_PASSWORD", "APP_DB_PASSWORD")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def aliases(settings: type[BaseSettings]) -> set[str]:
    return {f.alias or name for name, f in settings.model_fields.items()}


@pytest.mark.parametrize(
    ("service", "settings", "port_variable"),
    [("telemetry", TelemetrySettings, "TELEMETRY_PORT"), ("app", AppSettings, "APP_PORT")],
)
def test_service_matches_its_settings(
    service: str, settings: type[BaseSettings], port_variable: str
) -> None:
    spec = compose()["services"][service]
    env = spec["environment"]
    assert set(env) <= aliases(settings), "compose sets a variable the service does not read"
    default_port = settings.model_fields[
        next(n for n, f in settings.model_fields.items() if f.alias == port_variable)
    ].default
    assert env[port_variable] == str(default_port)
    # Loopback unless the operator says otherwise.
    assert spec["ports"] == [f"${{SWAMP_BIND_ADDRESS:-127.0.0.1}}:{default_port}:{default_port}"]
    assert spec["restart"] == "unless-stopped"
    assert spec["image"] == "swamp-club:${SWAMP_CLUB_TAG:-local}"
    # Longer than the drain's own deadline, so compose never SIGKILLs a drain.
    assert int(spec["stop_grace_period"].rstrip("s")) > SHUTDOWN_DEADLINE_SECONDS
    assert spec["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert "healthcheck" in spec
    assert "replicaSet=rs0" in env["MONGODB_URI"]


def test_mongo_is_a_replica_set_with_a_healthcheck() -> None:
    spec = compose()["services"]["mongo"]
    assert spec["image"].startswith("mongo:8")
    assert "--replSet" in (ROOT / "deploy" / "mongo-keyfile.sh").read_text()
    check = spec["healthcheck"]["test"]
    assert "/deploy/mongo-healthcheck.js" in check
    assert "rs.initiate" in (ROOT / "deploy" / "mongo-healthcheck.js").read_text()
    # No secret on a command line: `ps` and `docker inspect` would show it.
    assert not any("PASSWORD" in part for part in check)
    assert spec["restart"] == "unless-stopped"


def test_one_image_built_once_and_a_lean_build_context() -> None:
    services = compose()["services"]
    assert [name for name, spec in services.items() if "build" in spec] == ["telemetry"]
    assert services["app"]["image"] == services["telemetry"]["image"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", ".env", ".git/", ".swamp-data/"} <= set(ignored)
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_each_service_user_reaches_only_its_database_and_the_bus() -> None:
    script = (ROOT / "deploy" / "mongo-init.js").read_text()
    blocks = re.findall(r"createUser\(\{(.*?)\}\);", script, flags=re.S)
    grants = {
        re.search(r"user: (env\.\w+)", block).group(1): re.findall(  # type: ignore[union-attr]
            r'\{ role: "(\w+)", db: ([^}]+?) \}', block
        )
        for block in blocks
    }
    assert grants == {
        "env.TELEMETRY_DB_USER": [
            ("readWrite", 'env.TELEMETRY_DB || "telemetry"'),
            ("readWrite", "bus"),
            ("dbAdmin", "bus"),
        ],
        "env.APP_DB_USER": [
            ("readWrite", 'env.APP_DB || "swamp_club"'),
            ("readWrite", "bus"),
            ("dbAdmin", "bus"),
        ],
    }


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file_and_refuses_to_run_without_secrets() -> None:
    def config(secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
        # A clean environment: a developer's own variables must not satisfy the check.
        return subprocess.run(
            ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": os.environ["PATH"], **secrets},
        )

    secrets = {name: f"generated-{name.lower()}" for name in SECRETS}
    accepted = config(secrets)
    assert accepted.returncode == 0, accepted.stderr
    for missing in SECRETS:
        refused = config({k: v for k, v in secrets.items() if k != missing})
        assert refused.returncode != 0
        assert f"set {missing}" in refused.stderr
