"""The ``swamp-club`` command line. Exit codes: 0 ok, 1 a check found problems, 2 bad usage
or configuration (a taken port or data directory included), 3 the database is unreachable,
130 a forced stop (a second Ctrl-C, or a shutdown past its deadline)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator

import typer

from shared_contracts.observability import configure_logging
from shared_contracts.settings import SettingsError, load_settings
from swamp_club.app_cli import app_cli
from swamp_club.embedded_db import EmbeddedDb, EmbeddedDbError, refuse_taken_port
from swamp_club.events_cli import events_cli
from swamp_club.instance import InstanceError, exclusive, write_state
from swamp_club.operator import EXIT_USAGE, fail
from swamp_club.queue_cli import contracts_cli, queue_cli
from swamp_club.settings import LauncherSettings
from swamp_club.telemetry_cli import telemetry_cli

cli = typer.Typer(help="swamp-club: telemetry ingest and user scoring.", no_args_is_help=True)
cli.add_typer(telemetry_cli, name="telemetry")
cli.add_typer(app_cli, name="app")
cli.add_typer(queue_cli, name="queue")
cli.add_typer(contracts_cli, name="contracts")
cli.add_typer(events_cli, name="events")


@contextlib.contextmanager
def database_uri(launcher: LauncherSettings) -> Iterator[tuple[str, Callable[[], None] | None]]:
    """MONGODB_URI if set; otherwise the embedded server with a persistent data directory, which
    this process then owns alone (a second copy is refused) and stops last, on the way out.
    Yields the URI and what a forced exit must still do (stop the embedded server)."""
    if launcher.mongodb_uri:
        yield launcher.mongodb_uri, None
        return
    data_dir = launcher.data_dir.resolve()
    with exclusive(data_dir):
        db = EmbeddedDb(
            storage_path=data_dir / "db",
            port=launcher.embedded_db_port,
            log_path=data_dir / "embedded-db.log",
        )
        with db:
            assert db.pid is not None
            write_state(data_dir, uri=db.uri, db_pid=db.pid)
            typer.echo(f"embedded database ready at {db.uri} (data in {data_dir / 'db'})")
            yield db.uri, lambda: db.stop(timeout=5)


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
    from swamp_club.servers import (
        make_server,
        run_abandoning_leftovers,
        serve_until_signalled,
    )
    from telemetry_service.main import create_app as create_telemetry_app
    from telemetry_service.settings import TelemetrySettings

    try:
        launcher = load_settings(LauncherSettings)
        with database_uri(launcher) as (uri, on_force):
            os.environ["MONGODB_URI"] = uri
            telemetry = load_settings(TelemetrySettings)
            main_app = load_settings(AppSettings)
            # Before the banner: a URL printed for a port another process serves would lie.
            refuse_taken_port(telemetry.host, telemetry.port, setting="TELEMETRY_PORT")
            refuse_taken_port(main_app.host, main_app.port, setting="APP_PORT")
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
            run_abandoning_leftovers(serve_until_signalled(servers, on_force=on_force))
        # Leaving the block above stopped the embedded database: after the services drained.
    except (SettingsError, EmbeddedDbError, InstanceError) as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    typer.echo("stopped.")


def main() -> None:
    configure_logging()
    cli()
