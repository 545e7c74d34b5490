"""Main app settings: the bus settings plus its own database, port and workers (nothing of
telemetry's: the app has no way to address the telemetry database, I5)."""

from pydantic import Field

from shared_contracts.settings import BusSettings


class AppSettings(BusSettings):
    app_db: str = Field(default="swamp_club", alias="APP_DB", min_length=1, max_length=38)
    host: str = Field(default="127.0.0.1", alias="APP_HOST")
    port: int = Field(default=8000, alias="APP_PORT", ge=1, le=65535)
    score_history_cap: int = Field(default=50, alias="SCORE_HISTORY_CAP", ge=1, le=10_000)
    score_refresh_batch_size: int = Field(
        default=100,
        alias="SCORE_REFRESH_BATCH_SIZE",
        ge=1,
        le=1000,
        description="Score refreshes claimed and applied together, in one transaction "
        "(1: one at a time).",
    )
    max_body_bytes: int = Field(
        default=64 * 1024,
        alias="APP_MAX_BODY_BYTES",
        ge=1024,
        description="Larger request bodies get 413 (the app's bodies are a few hundred bytes).",
    )
    run_workers: bool = Field(
        default=True,
        alias="APP_RUN_WORKERS",
        description="Run the score-refresh consumer inside the API process.",
    )
