"""Shutdown steps with deadlines: a service that cannot reach its database must still stop.

Without a deadline, stopping the workers or closing the client waits on server selection for as
long as the database is gone (the process hung for minutes after a Ctrl-C that had killed the
embedded database first). A step that overruns is abandoned: stopping uncleanly is safe here,
every claim is leased and every batch is one transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)

#: Workers get their grace period (10 s) plus time to release claims.
WORKERS_STOP_SECONDS = 20.0
CLIENT_CLOSE_SECONDS = 5.0


def where(task: asyncio.Task[object]) -> str:
    """Where a task waits: its innermost frame of our own code, and the innermost overall."""
    frames = task.get_stack()
    ours = [f for f in frames if "site-packages" not in f.f_code.co_filename]
    shown = [*ours[-1:], *frames[-1:]] if ours and ours[-1] is not frames[-1] else frames[-1:]
    return " > ".join(f"{f.f_code.co_filename}:{f.f_lineno}" for f in shown)


async def within(step: Awaitable[None], *, seconds: float, what: str) -> None:
    """Await ``step`` for at most ``seconds``; log and go on if it overruns."""
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        # Name what was still running, with where it waits: the next hang is then one log away.
        stuck = [
            f"{task.get_name()} at {where(task)}"
            for task in asyncio.all_tasks()
            if task is not asyncio.current_task()
        ]
        log.error(
            "%s did not finish within %gs; going on without it (still running: %s)",
            what,
            seconds,
            "; ".join(stuck) or "nothing",
        )
