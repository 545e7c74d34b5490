"""The ``swamp-club`` command line. Exit codes: 0 ok, 1 a check found problems, 2 bad usage
or configuration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Iterator

import typer

from shared_contracts.observability import configure_logging
from shared_contracts.settings import SettingsError, load_settings
from swamp_club.app_cli import app_cli
from swamp_club.embedded_db import EmbeddedDb, EmbeddedDbError
from swamp_club.events_cli import events_cli
from swamp_club.queue_cli import contracts_cli, queue_cli
from swamp_club.settings import LauncherSettings
from swamp_club.telemetry_cli import telemetry_cli

cli = typer.Typer(help="swamp-club: telemetry ingest and user scoring.", no_args_is_help=True)
cli.add_typer(telemetry_cli, name="telemetry")
cli.add_typer(app_cli, name="app")
cli.add_typer(queue_cli, name="queue")
cli.add_typer(contracts_cli, name="contracts")
cli.add_typer(events_cli, name="events")

EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@contextlib.contextmanager
def database_uri(launcher: LauncherSettings) -> Iterator[str]:
    """MONGODB_URI if set; otherwise the embedded server with a persistent data directory."""
    if launcher.mongodb_uri:
        yield launcher.mongodb_uri
        return
    data_dir = launcher.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    db = EmbeddedDb(
        storage_path=data_dir / "db",
        port=launcher.embedded_db_port,
        log_path=data_dir / "embedded-db.log",
    )
    with db:
        typer.echo(f"embedded database ready at {db.uri} (data in {data_dir / 'db'})")
        yield db.uri


def sample_curl(host: str, port: int) -> str:
    event_id = str(uuid.uuid4())
    event = {
        "event": "cli_invocation",
        "distinct_id": str(uuid.uuid4()),
        "insert_id": event_id,
        "properties": {
            "id": event_id,
            "invocation": {"command": "model", "subcommand": "create"},
            "result": {"status": "success", "exitCode": 0},
        },
    }
    body = json.dumps(event, separators=(",", ":"))
    return f"curl -s http://{host}:{port}/ingest -H 'content-type: application/json' -d '{body}'"


@cli.command()
def up() -> None:
    """Run the whole system: the database (embedded unless MONGODB_URI), both services, their
    workers. Ctrl-C stops everything."""
    from swamp_app.main import create_app as create_main_app
    from swamp_app.settings import AppSettings
    from swamp_club.servers import make_server, serve_until_signalled
    from telemetry_service.main import create_app as create_telemetry_app
    from telemetry_service.settings import TelemetrySettings

    try:
        launcher = load_settings(LauncherSettings)
        with database_uri(launcher) as uri:
            os.environ["MONGODB_URI"] = uri
            telemetry = load_settings(TelemetrySettings)
            main_app = load_settings(AppSettings)
            servers = [
                make_server(
                    create_telemetry_app(telemetry), host=telemetry.host, port=telemetry.port
                ),
                make_server(create_main_app(main_app), host=main_app.host, port=main_app.port),
            ]
            typer.echo(
                f"telemetry service: http://{telemetry.host}:{telemetry.port}  (POST /ingest)"
            )
            typer.echo(f"main app:          http://{main_app.host}:{main_app.port}  (/docs)")
            typer.echo(f"try it:  {sample_curl(telemetry.host, telemetry.port)}")
            typer.echo("Ctrl-C stops everything.")
            asyncio.run(serve_until_signalled(servers))
    except (SettingsError, EmbeddedDbError) as exc:
        raise fail(str(exc)) from None
    typer.echo("stopped.")


def main() -> None:
    configure_logging()
    cli()
