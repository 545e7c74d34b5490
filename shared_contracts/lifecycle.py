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
from typing import Any

import pymongo
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)

#: Longer than the 60 s a transaction left open by a crashed process can hold documents: a batch
#: waiting on one must be let finish, or abandoning it would leave an open transaction of ours
#: blocking the next start-up's writes for another minute. A dead database fails much faster.
WORKERS_STOP_SECONDS = 75.0
#: With the database unreachable nothing in flight can commit: waiting for it is pointless.
UNREACHABLE_STOP_SECONDS = 5.0
CLIENT_CLOSE_SECONDS = 5.0


async def workers_stop_seconds(client: AsyncMongoClient[dict[str, Any]]) -> float:
    """How long the workers may take to stop: long if the database answers (in-flight batches
    finish), short if it does not (each of their operations would wait on server selection)."""
    try:
        with pymongo.timeout(1.0):
            await client.admin.command("ping")
    except PyMongoError:
        return UNREACHABLE_STOP_SECONDS
    return WORKERS_STOP_SECONDS


def where(task: asyncio.Task[object]) -> str:
    """Where a task waits: its innermost frame of our own code, and the innermost overall."""
    frames = task.get_stack()
    ours = [f for f in frames if "site-packages" not in f.f_code.co_filename]
    shown = [*ours[-1:], *frames[-1:]] if ours and ours[-1] is not frames[-1] else frames[-1:]
    return " > ".join(f"{f.f_code.co_filename}:{f.f_lineno}" for f in shown)


async def within(step: Awaitable[None], *, seconds: float, what: str) -> None:
    """Await ``step`` for at most ``seconds``; log and go on if it overruns. The overrun step is
    cancelled but not awaited: a driver call stuck in server selection can take as long to
    cancel as to finish, and it must not hold the shutdown."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        task.result()
        return
    # Name what was still running, with where it waits: the next hang is then one log away.
    stuck = [
        f"{other.get_name()} at {where(other)}"
        for other in asyncio.all_tasks()
        if other is not asyncio.current_task()
    ]
    task.cancel()
    log.error(
        "%s did not finish within %gs; going on without it (still running: %s)",
        what,
        seconds,
        "; ".join(stuck) or "nothing",
    )
