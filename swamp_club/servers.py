"""Run several uvicorn servers in one event loop and stop them together.

uvicorn installs its own signal handlers per server; with two servers in one loop only the last
one would hear Ctrl-C. So servers here leave signals alone and the caller stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

#: In-flight HTTP requests get this long after Ctrl-C before their connections are closed.
HTTP_DRAIN_SECONDS = 10
#: A shutdown that takes longer than this is forced (each step has its own, shorter, deadline).
SHUTDOWN_DEADLINE_SECONDS = 100.0
#: The exit code of a forced exit (a second Ctrl-C, or the deadline), as a shell reports SIGINT.
EXIT_FORCED = 130


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: FastAPI, *, host: str, port: int, log_level: str = "warning") -> Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        # Our own middleware writes one JSON access line per request (with its request id);
        # uvicorn's plain-text access lines on stdout would duplicate it in another format.
        access_log=False,
        # No logging config of uvicorn's own: its loggers propagate to our JSON handler.
        log_config=None,
        timeout_graceful_shutdown=HTTP_DRAIN_SECONDS,
    )
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


def force_exit(on_force: Callable[[], None] | None, reason: str) -> None:
    """Leave now: stop what must not be orphaned (the embedded database), then exit."""
    log.warning("forcing exit: %s", reason)
    try:
        if on_force is not None:
            on_force()
    finally:
        os._exit(EXIT_FORCED)


async def serve_until_signalled(
    servers: list[Server],
    *,
    on_force: Callable[[], None] | None = None,
    deadline_seconds: float = SHUTDOWN_DEADLINE_SECONDS,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain. A second signal forces the exit at once, and so
    does a drain that outlives ``deadline_seconds``; ``on_force`` runs first either way."""
    loop = asyncio.get_running_loop()
    watchdog: threading.Timer | None = None

    def stop() -> None:
        nonlocal watchdog
        if watchdog is not None:
            force_exit(on_force, "second interrupt")
        # A thread, not a loop callback: it must fire even if the loop is stuck.
        watchdog = threading.Timer(
            deadline_seconds,
            force_exit,
            args=(on_force, f"shutdown took longer than {deadline_seconds:g}s"),
        )
        watchdog.daemon = True
        watchdog.start()
        log.info("stopping: draining requests and workers (Ctrl-C again forces the exit)")
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if watchdog is not None:
            watchdog.cancel()


def run_abandoning_leftovers(main: Coroutine[Any, Any, None], *, grace: float = 2.0) -> None:
    """Like asyncio.run, except that tasks still running when ``main`` returns (a shutdown step
    that overran its deadline) get ``grace`` seconds to take their cancellation, then are left:
    asyncio.run would wait for them forever."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main)
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=grace))
    finally:
        loop.close()
