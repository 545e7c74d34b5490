"""The app's background worker: the score-refresh consumer (in-process or `app worker`)."""

from __future__ import annotations

import asyncio

from swamp_app.runtime import AppRuntime
from swamp_app.scores.consumer import score_refresh_consumer


class AppWorkers:
    def __init__(self, runtime: AppRuntime) -> None:
        self.refreshes = score_refresh_consumer(runtime)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.refreshes.run(), name="score-refresh-consumer")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, *, grace_seconds: float = 10.0) -> None:
        self.refreshes.stop(grace_seconds=grace_seconds)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
