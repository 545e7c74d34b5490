"""`swamp-club telemetry ...`: serve the API, run the workers alone, verify I4."""

from __future__ import annotations

import asyncio
import json

import typer

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
        runtime = await open_runtime(settings_or_exit(TelemetrySettings))
        try:
            return [str(d) for d in await find_drift(runtime.db)]
        finally:
            await runtime.client.close()

    drift = asyncio.run(main())
    if as_json:
        typer.echo(json.dumps({"drift": drift}))
    else:
        for line in drift:
            typer.echo(line)
        typer.echo(f"{len(drift)} username(s) drifted" if drift else "no drift")
    raise typer.Exit(1 if drift else 0)
