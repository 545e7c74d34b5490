"""`swamp-club app ...`: serve the API, or run only the score-refresh consumer."""

from __future__ import annotations

import asyncio

import typer

from shared_contracts.settings import SettingsError, load_settings
from swamp_app.settings import AppSettings
from swamp_club.telemetry_cli import until_signalled

app_cli = typer.Typer(help="The main app.", no_args_is_help=True)


def settings() -> AppSettings:
    try:
        return load_settings(AppSettings)
    except SettingsError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


@app_cli.command("serve")
def serve() -> None:
    """Serve the app's API (with its worker unless APP_RUN_WORKERS=false)."""
    from swamp_app.main import create_app
    from swamp_club.servers import make_server, serve_until_signalled

    s = settings()
    server = make_server(create_app(s), host=s.host, port=s.port, log_level="info")
    asyncio.run(serve_until_signalled([server]))


@app_cli.command("worker")
def worker() -> None:
    """Run only the score-refresh consumer; scale it separately from the API."""
    from swamp_app.main import open_runtime
    from swamp_app.workers import AppWorkers

    async def main() -> None:
        runtime = await open_runtime(settings())
        workers = AppWorkers(runtime)
        workers.start()
        typer.echo("app worker running; Ctrl-C stops it")
        try:
            await until_signalled()
        finally:
            await workers.stop()
            await runtime.client.close()

    asyncio.run(main())
