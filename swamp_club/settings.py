"""Settings of the launcher itself (where the embedded database keeps its data)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LauncherSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    #: When set, nothing is started: every process uses this deployment.
    mongodb_uri: str | None = Field(
        default=None, alias="MONGODB_URI", pattern=r"^mongodb(\+srv)?://"
    )
    data_dir: Path = Field(default=Path(".swamp-data"), alias="SWAMP_DATA_DIR")
    embedded_db_port: int = Field(default=27018, alias="EMBEDDED_DB_PORT", ge=1, le=65535)
