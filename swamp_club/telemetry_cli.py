"""`swamp-club telemetry ...`: serve the API, run the workers alone, verify I4."""

from __future__ import annotations

import json

import typer

from swamp_club.operator import operator_settings, run_on_database
from swamp_club.service_commands import run_workers, serve, settings_or_exit
from telemetry_service.settings import TelemetrySettings

telemetry_cli = typer.Typer(help="The telemetry service.", no_args_is_help=True)


@telemetry_cli.command("serve")
def serve_command() -> None:
    """Serve the telemetry API (with its workers unless TELEMETRY_RUN_WORKERS=false)."""
    from telemetry_service.main import create_app

    settings = settings_or_exit(TelemetrySettings)
    serve(create_app(settings), host=settings.host, port=settings.port)


@telemetry_cli.command("worker")
def worker() -> None:
    """Run only the workers (ingest watcher, command consumer); scale them separately."""
    from telemetry_service.main import open_runtime
    from telemetry_service.workers import TelemetryWorkers

    settings = settings_or_exit(TelemetrySettings)
    run_workers(lambda: open_runtime(settings), TelemetryWorkers, label="telemetry workers")


@telemetry_cli.command("verify")
def verify(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check I4 for every username: the stored projection equals the fold. Exit 1 on drift."""
    from telemetry_service.main import open_runtime
    from telemetry_service.projection.verify import find_drift

    async def main() -> list[str]:
        runtime = await open_runtime(settings)
        try:
            return [str(d) for d in await find_drift(runtime.db)]
        finally:
            await runtime.client.close()

    settings = operator_settings(TelemetrySettings)
    drift = run_on_database(main)
    if as_json:
        typer.echo(json.dumps({"drift": drift}))
    else:
        for line in drift:
            typer.echo(line)
        typer.echo(f"{len(drift)} username(s) drifted" if drift else "no drift")
    raise typer.Exit(1 if drift else 0)


@telemetry_cli.command("backfill")
def backfill(
    status: bool = typer.Option(False, "--status", help="Show the backfill's state and exit."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Count the projections that would change; write nothing."
    ),
    rerun: bool = typer.Option(
        False, "--rerun", help="Forget the marker and run the whole backfill again, now."
    ),
) -> None:
    """The one-time username_metrics backfill (runs by itself at service start-up)."""
    from telemetry_service.backfill import Backfill
    from telemetry_service.main import open_runtime
    from telemetry_service.projection.verify import find_drift

    if sum((status, dry_run, rerun)) > 1:
        typer.secho("error: choose one of --status, --dry-run, --rerun", err=True)
        raise typer.Exit(2)

    async def main() -> str:
        runtime = await open_runtime(settings)
        job = Backfill(runtime)
        try:
            if status:
                marker = await job.status()
                return json.dumps({k: v for k, v in marker.items() if k != "_id"}, default=str)
            if dry_run:
                drift = await find_drift(runtime.db)
                return f"{len(drift)} projection(s) would change"
            if rerun:
                await job.reset()
            ran = await job.run_if_needed()
            marker = await job.status()
            verb = "ran" if ran else "did not run (done, or another replica holds the lease)"
            return (
                f"backfill {verb}: {marker.get('status')}, {marker.get('usernames', 0)} usernames"
            )
        finally:
            await runtime.client.close()

    settings = operator_settings(TelemetrySettings)
    typer.echo(run_on_database(main))
