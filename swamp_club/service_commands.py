"""What `telemetry serve|worker` and `app serve|worker` share: load settings, serve an app, or
run a service's workers until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import typer
from fastapi import FastAPI
from pydantic_settings import BaseSettings

from shared_contracts.settings import SettingsError, load_settings

S = TypeVar("S", bound=BaseSettings)


class Workers(Protocol):
    def start(self) -> None: ...
    async def stop(self, *, grace_seconds: float = 10.0) -> None: ...


class Runtime(Protocol):
    @property
    def client(self) -> Any: ...


def settings_or_exit(cls: type[S]) -> S:
    try:
        return load_settings(cls)
    except SettingsError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def serve(app: FastAPI, *, host: str, port: int) -> None:
    from swamp_club.servers import make_server, run_abandoning_leftovers, serve_until_signalled

    server = make_server(app, host=host, port=port, log_level="info")
    run_abandoning_leftovers(serve_until_signalled([server]))


def run_workers(
    open_runtime: Callable[[], Awaitable[Runtime]],
    make_workers: Callable[[Any], Workers],
    *,
    label: str,
) -> None:
    async def main() -> None:
        runtime = await open_runtime()
        workers = make_workers(runtime)
        workers.start()
        typer.echo(f"{label} running; Ctrl-C stops it")
        try:
            await until_signalled()
        finally:
            await workers.stop()
            await runtime.client.close()

    asyncio.run(main())
