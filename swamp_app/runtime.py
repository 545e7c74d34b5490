"""What the main app holds while it runs: settings, the client, its databases."""

from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from swamp_app.settings import AppSettings


@dataclass(frozen=True, slots=True)
class AppRuntime:
    settings: AppSettings
    client: AsyncMongoClient[dict[str, Any]]

    @property
    def db(self) -> AsyncDatabase[dict[str, Any]]:
        return self.client[self.settings.app_db]

    @property
    def bus(self) -> AsyncDatabase[dict[str, Any]]:
        return self.client[self.settings.bus_db]
