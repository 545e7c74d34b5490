"""Sleep until a collection changes (change stream) or a poll interval passes.

Workers call ``clear()`` before looking for work and ``wait()`` when they found none, so a change
that arrives while they look is not lost. If change streams fail, ``active`` is False and the
workers simply poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

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
    ) -> None:
        self.collection = collection
        self.pipeline = pipeline
        self.poll_interval_seconds = poll_interval_seconds
        self.use_change_streams = use_change_streams
        self.active = False
        self._event = asyncio.Event()

    def clear(self) -> None:
        self._event.clear()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds or self.poll_interval_seconds)

    async def watch_forever(self) -> None:
        """Run as a background task; returns at once when change streams are off."""
        while self.use_change_streams:
            try:
                async with await self.collection.watch(self.pipeline) as stream:
                    self.active = True
                    self._event.set()  # anything that arrived before the stream opened
                    async for _ in stream:
                        self._event.set()
            except PyMongoError as exc:
                log.warning(
                    "%s: change stream unavailable, polling (%s)", self.collection.name, exc
                )
            self.active = False
            await asyncio.sleep(self.poll_interval_seconds)
