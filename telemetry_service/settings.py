"""Telemetry service settings: the bus settings plus its own database and port."""

from pydantic import Field

from shared_contracts.settings import BusSettings


class TelemetrySettings(BusSettings):
    telemetry_db: str = Field(
        default="telemetry", alias="TELEMETRY_DB", min_length=1, max_length=38
    )
    host: str = Field(default="127.0.0.1", alias="TELEMETRY_HOST")
    # 8080 is the swamp CLI's local default endpoint.
    port: int = Field(default=8080, alias="TELEMETRY_PORT", ge=1, le=65535)
