"""The telemetry service's background workers, started and stopped as one unit.

They run inside the API process by default (TELEMETRY_RUN_WORKERS) or on their own with
`swamp-club telemetry worker`; any number of replicas is safe (leased claims).
"""

from __future__ import annotations

import asyncio
import logging

from telemetry_service.backfill import Backfill
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)


class TelemetryWorkers:
    def __init__(self, runtime: TelemetryRuntime) -> None:
        self.watcher = IngestWatcher(runtime)
        self.commands = command_consumer(runtime)
        self.backfill = Backfill(runtime) if runtime.settings.run_backfill else None
        self._tasks: list[asyncio.Task[None]] = []
        self._backfill_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.watcher.run(), name="ingest-watcher"),
            asyncio.create_task(self.commands.run(), name="command-consumer"),
        ]
        if self.backfill is not None:
            # Runs once and ends; it is not part of `alive`.
            self._backfill_task = asyncio.create_task(
                self.backfill.run_in_background(), name="backfill"
            )

    @property
    def alive(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def stop(self, *, grace_seconds: float = 10.0) -> None:
        """Finish in-flight work (or release it), then return."""
        self.watcher.stop()
        self.commands.stop(grace_seconds=grace_seconds)
        if self._backfill_task is not None:
            # Stopping mid-batch is safe: the batch's transaction aborts and is redone later.
            self._backfill_task.cancel()
            await asyncio.gather(self._backfill_task, return_exceptions=True)
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for task, result in zip(self._tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("worker %s ended with %r", task.get_name(), result)
        self._tasks = []
