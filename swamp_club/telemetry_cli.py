"""`swamp-club telemetry ...`: serve the API, run the workers alone, verify I4."""

from __future__ import annotations

import asyncio
import json
import signal

import typer

from shared_contracts.settings import SettingsError, load_settings
from telemetry_service.settings import TelemetrySettings

telemetry_cli = typer.Typer(help="The telemetry service.", no_args_is_help=True)


def settings() -> TelemetrySettings:
    try:
        return load_settings(TelemetrySettings)
    except SettingsError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@telemetry_cli.command("serve")
def serve() -> None:
    """Serve the telemetry API (with its workers unless TELEMETRY_RUN_WORKERS=false)."""
    from swamp_club.servers import make_server, serve_until_signalled
    from telemetry_service.main import create_app

    s = settings()
    server = make_server(create_app(s), host=s.host, port=s.port, log_level="info")
    asyncio.run(serve_until_signalled([server]))


@telemetry_cli.command("worker")
def worker() -> None:
    """Run only the workers (ingest watcher, command consumer); scale them separately."""
    from telemetry_service.main import open_runtime
    from telemetry_service.workers import TelemetryWorkers

    async def main() -> None:
        runtime = await open_runtime(settings())
        workers = TelemetryWorkers(runtime)
        workers.start()
        typer.echo("telemetry workers running; Ctrl-C stops them")
        try:
            await until_signalled()
        finally:
            await workers.stop()
            await runtime.client.close()

    asyncio.run(main())


@telemetry_cli.command("verify")
def verify(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check I4 for every username: the stored projection equals the fold. Exit 1 on drift."""
    from telemetry_service.main import open_runtime
    from telemetry_service.projection.verify import find_drift

    async def main() -> list[str]:
        runtime = await open_runtime(settings())
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
