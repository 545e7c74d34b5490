"""What the main app holds while it runs: settings, the client, its database, the queues."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from shared_contracts.queue.engine import Queue
from swamp_app.settings import AppSettings


@dataclass(frozen=True, slots=True)
class AppRuntime:
    settings: AppSettings
    client: AsyncMongoClient[dict[str, Any]]
    #: Outgoing: commands for telemetry.
    commands: Queue = field(init=False)
    #: Incoming: score refreshes from telemetry.
    refreshes: Queue = field(init=False)

    def __post_init__(self) -> None:
        bus = self.client[self.settings.bus_db]
        config = self.settings.queue_config()
        object.__setattr__(self, "commands", Queue(bus[TELEMETRY_COMMANDS], config=config))
        object.__setattr__(self, "refreshes", Queue(bus[SWAMP_CLUB_EVENTS], config=config))

    @property
    def db(self) -> AsyncDatabase[dict[str, Any]]:
        return self.client[self.settings.app_db]
