"""What the telemetry service holds while it runs: settings, the client, its databases."""

from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from telemetry_service.settings import TelemetrySettings


@dataclass(frozen=True, slots=True)
class TelemetryRuntime:
    settings: TelemetrySettings
    client: AsyncMongoClient[dict[str, Any]]

    @property
    def db(self) -> AsyncDatabase[dict[str, Any]]:
        return self.client[self.settings.telemetry_db]

    @property
    def bus(self) -> AsyncDatabase[dict[str, Any]]:
        return self.client[self.settings.bus_db]
