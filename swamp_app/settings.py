"""Main app settings: the bus settings plus its own database and port (nothing of telemetry's)."""

from pydantic import Field

from shared_contracts.settings import BusSettings


class AppSettings(BusSettings):
    app_db: str = Field(default="swamp_club", alias="APP_DB", min_length=1, max_length=38)
    host: str = Field(default="127.0.0.1", alias="APP_HOST")
    port: int = Field(default=8000, alias="APP_PORT", ge=1, le=65535)
