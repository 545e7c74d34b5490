"""Sleep until a collection changes (change stream) or a poll interval passes.

Workers call ``clear()`` before looking for work and ``wait()`` when they found none, so a change
that arrives while they look is not lost. If change streams fail, ``active`` is False and the
workers simply poll.

The stream is read only while a worker waits. A busy worker looks for more work anyway, so a
getMore per change would be spent on news it does not need; on the embedded server each getMore
reads the oplog, which is what a busy pipeline's streams cost it. The changes made meanwhile stay
in the stream, behind its resume point: the first read of the next wait returns them at once (one
look that may find nothing), so a change made after the worker last looked is never missed. (On
mongod a stream left unread for longer than the oplog's window cannot resume: it fails, the
worker polls once, and a new stream opens, as after any stream error.)

A read that brings nothing is not followed by another for ``read_interval_seconds`` from its
start. The embedded server answers a waiting stream's read at every write to any collection of
any database, with nothing when the write is not one the stream matches: an idle worker (the
command consumer, a queue with no work) read its stream once per write of the whole pipeline,
and each read reads the oplog. With the interval, an idle stream costs at most one read per
interval however busy the server is; what changed during the pause is still behind the stream's
resume point, so a wake-up comes at most that much later, and only while other writes keep the
server busy. A read that waited its full time (mongod, or an idle embedded server) is followed
at once.

Only the telemetry command consumer rests (COMMAND_STREAM_READ_INTERVAL_SECONDS): it waits
nearly always, and a command may wait a tenth of a second. On the event path (the watcher, the
app's refresh consumer) a 0.05 s rest cut the reads by 40-65% and cost lag more than they cost
the server: at 80% of capacity p99 1.201 -> 1.465 s (README, "Benchmarks").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)


class Wakeup:
    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]],
        pipeline: list[dict[str, Any]],
        *,
        poll_interval_seconds: float,
        use_change_streams: bool = True,
        read_interval_seconds: float = 0.0,
    ) -> None:
        self.collection = collection
        self.pipeline = pipeline
        self.poll_interval_seconds = poll_interval_seconds
        self.use_change_streams = use_change_streams
        self.read_interval_seconds = read_interval_seconds
        self.active = False
        self._event = asyncio.Event()
        #: Set while a worker waits in ``wait(stream=True)``: only then is the stream read.
        self._wanted = asyncio.Event()
        self._waiting = 0

    def clear(self) -> None:
        self._event.clear()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float | None = None, *, stream: bool = True) -> bool:
        """Until a change (``set``: True), or ``seconds`` (the poll interval by default) pass.
        ``stream=False``: the change stream is not read meanwhile (a replica with nothing to do
        but wait for a lease: news of every write would only wake it to fail to take it)."""
        if stream:
            self._waiting += 1
            self._wanted.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), seconds or self.poll_interval_seconds)
            return self._event.is_set()
        finally:
            if stream:
                self._waiting -= 1
                if not self._waiting:
                    self._wanted.clear()

    async def watch_forever(self) -> None:
        """Run as a background task; returns at once when change streams are off."""
        while self.use_change_streams:
            try:
                async with await self.collection.watch(self.pipeline) as stream:
                    self.active = True
                    self._event.set()  # anything that arrived before the stream opened
                    await self._read_while_wanted(stream)
            except PyMongoError as exc:
                log.warning(
                    "%s: change stream unavailable, polling (%s)", self.collection.name, exc
                )
            self.active = False
            await asyncio.sleep(self.poll_interval_seconds)

    async def _read_while_wanted(self, stream: AsyncChangeStream[dict[str, Any]]) -> None:
        """Read while a worker waits; after a read that brought nothing, not again until
        ``read_interval_seconds`` after it began (the module docstring says why)."""
        loop = asyncio.get_running_loop()
        next_read = loop.time()
        while stream.alive:
            await self._wanted.wait()
            if (pause := next_read - loop.time()) > 0:
                await asyncio.sleep(pause)
                continue  # the worker may have stopped waiting meanwhile: read only if it waits
            started = loop.time()
            if await stream.try_next() is not None:
                self._event.set()
                next_read = started
            else:
                next_read = started + self.read_interval_seconds
