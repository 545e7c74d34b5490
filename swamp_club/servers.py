"""Run several uvicorn servers in one event loop and stop them together.

uvicorn installs its own signal handlers per server; with two servers in one loop only the last
one would hear Ctrl-C. So servers here leave signals alone and the caller stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: FastAPI, *, host: str, port: int, log_level: str = "warning") -> Server:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    return Server(config)


@contextlib.asynccontextmanager
async def running(server: Server, *, start_timeout: float = 30.0) -> AsyncIterator[Server]:
    """Serve in the background until the block exits; used by tests and benchmarks."""
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(start_timeout):
            while not server.started:
                if task.done():
                    task.result()  # re-raise the start-up failure
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.02)
        yield server
    finally:
        server.should_exit = True
        await task


async def serve_until_signalled(servers: list[Server]) -> None:
    """Serve until SIGINT/SIGTERM; a second Ctrl-C forces the exit."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.force_exit = server.should_exit
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
