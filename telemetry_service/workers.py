"""The telemetry service's background workers, started and stopped as one unit.

They run inside the API process by default (TELEMETRY_RUN_WORKERS) or on their own with
`swamp-club telemetry worker`; any number of replicas is safe (leased claims).
"""

from __future__ import annotations

import asyncio
import logging

from pymongo.errors import PyMongoError

from telemetry_service.backfill import Backfill
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.identity.upgrade import IdentityUpgrade
from telemetry_service.processing.aside import adopt_older_release
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)


class TelemetryWorkers:
    def __init__(self, runtime: TelemetryRuntime) -> None:
        self.upgrade = IdentityUpgrade(runtime)
        self.watcher = IngestWatcher(runtime)
        self.commands = command_consumer(runtime)
        self.backfill = Backfill(runtime) if runtime.settings.run_backfill else None
        self._tasks: list[asyncio.Task[None]] = []
        self._backfill_task: asyncio.Task[None] | None = None
        self._startup: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._startup = asyncio.create_task(self._start_after_upgrade(), name="identity-upgrade")

    async def _start_after_upgrade(self) -> None:
        # Nothing may read or write identities in the old layout, and the watcher claims aside
        # from events_aside alone: the upgrade and the events an older release kept aside (and
        # numbered in arrival order) come first.
        while True:
            try:
                await self.upgrade.run()
                await adopt_older_release(self.upgrade.db)
                break
            except PyMongoError:
                log.exception("identity upgrade failed; retrying")
                await asyncio.sleep(5)
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
        if self._startup is None:
            return False
        if not self._startup.done():
            return True  # upgrading
        if self._startup.cancelled() or self._startup.exception() is not None:
            return False
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def stop(self, *, grace_seconds: float = 10.0) -> None:
        """Finish in-flight work (or release it), then return."""
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()  # an upgrade batch is one transaction: it aborts whole
            await asyncio.gather(self._startup, return_exceptions=True)
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
