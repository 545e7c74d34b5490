"""What the telemetry service holds while it runs: settings, the client, databases, queues."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from shared_contracts.queue.engine import Queue
from telemetry_service.ingest.group_commit import EventWriter
from telemetry_service.settings import TelemetrySettings


@dataclass(frozen=True, slots=True)
class TelemetryRuntime:
    settings: TelemetrySettings
    client: AsyncMongoClient[dict[str, Any]]
    #: Outgoing: score refreshes for the app.
    refreshes: Queue = field(init=False)
    #: Incoming: the app's commands.
    commands: Queue = field(init=False)
    #: Stores /ingest's events, concurrent requests together (ingest/group_commit.py).
    event_writer: EventWriter = field(init=False)

    def __post_init__(self) -> None:
        bus = self.client[self.settings.bus_db]
        config = self.settings.queue_config()
        object.__setattr__(self, "refreshes", Queue(bus[SWAMP_CLUB_EVENTS], config=config))
        commands_config = self.settings.queue_config(
            poll_interval_seconds=self.settings.command_poll_interval_seconds,
            stream_read_interval_seconds=self.settings.command_stream_read_interval_seconds,
        )
        object.__setattr__(self, "commands", Queue(bus[TELEMETRY_COMMANDS], config=commands_config))
        budget = self.settings.request_db_timeout_seconds
        object.__setattr__(self, "event_writer", EventWriter(self.db, budget_seconds=budget))

    @property
    def db(self) -> AsyncDatabase[dict[str, Any]]:
        return self.client[self.settings.telemetry_db]

    @property
    def bus(self) -> AsyncDatabase[dict[str, Any]]:
        return self.client[self.settings.bus_db]
