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
    """Check I4 for every user (projection = fold, names agree, devices bound) and list events
    set aside, events whose key counted as no key, and dead messages. Exit 1 unless clean."""
    from telemetry_service.main import open_runtime
    from telemetry_service.projection.verify import VerifyReport
    from telemetry_service.projection.verify import verify as run_verify

    async def main() -> VerifyReport:
        runtime = await open_runtime(settings)
        try:
            return await run_verify(runtime.db, runtime.bus)
        finally:
            await runtime.client.close()

    settings = operator_settings(TelemetrySettings)
    report = run_on_database(main)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        for drift in report.drift:
            typer.echo(str(drift))
        typer.echo(f"{len(report.drift)} user(s) drifted" if report.drift else "no drift")
        typer.echo(f"events set aside: {report.set_aside_events}")
        if report.not_adopted_events:
            typer.echo(
                f"events an older release kept aside, not adopted: {report.not_adopted_events}"
                " (swamp-club events adopt)"
            )
        unattributed = ", ".join(f"{why} {n}" for why, n in report.unattributed_events.items())
        typer.echo(f"events whose key counted as no key: {unattributed or 0}")
        dead = ", ".join(f"{queue} {n}" for queue, n in report.dead_messages.items())
        typer.echo(f"dead messages: {dead}")
    raise typer.Exit(0 if report.clean else 1)


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
            return f"backfill {verb}: {marker.get('status')}, {marker.get('users', 0)} users"
        finally:
            await runtime.client.close()

    settings = operator_settings(TelemetrySettings)
    typer.echo(run_on_database(main))
