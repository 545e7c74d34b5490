"""`swamp-club app ...`: serve the API, or run only the score-refresh consumer."""

from __future__ import annotations

import typer

from swamp_app.settings import AppSettings
from swamp_club.service_commands import run_workers, serve, settings_or_exit

app_cli = typer.Typer(help="The main app.", no_args_is_help=True)


@app_cli.command("serve")
def serve_command() -> None:
    """Serve the app's API (with its worker unless APP_RUN_WORKERS=false)."""
    from swamp_app.main import create_app

    settings = settings_or_exit(AppSettings)
    serve(create_app(settings), host=settings.host, port=settings.port)


@app_cli.command("worker")
def worker() -> None:
    """Run only the score-refresh consumer; scale it separately from the API."""
    from swamp_app.main import open_runtime
    from swamp_app.workers import AppWorkers

    settings = settings_or_exit(AppSettings)
    run_workers(lambda: open_runtime(settings), AppWorkers, label="app worker")
