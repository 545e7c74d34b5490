"""Telemetry service settings: the bus settings plus its own database, port and workers."""

from pydantic import Field

from shared_contracts.settings import BusSettings


class TelemetrySettings(BusSettings):
    telemetry_db: str = Field(
        default="telemetry", alias="TELEMETRY_DB", min_length=1, max_length=38
    )
    host: str = Field(default="127.0.0.1", alias="TELEMETRY_HOST")
    # 8080 is the swamp CLI's local default endpoint.
    port: int = Field(default=8080, alias="TELEMETRY_PORT", ge=1, le=65535)

    max_body_bytes: int = Field(default=1024 * 1024, alias="INGEST_MAX_BODY_BYTES", ge=1024)
    max_events_per_request: int = Field(default=1000, alias="INGEST_MAX_EVENTS", ge=1)
    ingest_batch_size: int = Field(default=500, alias="INGEST_BATCH_SIZE", ge=1, le=10_000)
    ingest_max_batch_size: int = Field(
        default=5000,
        alias="INGEST_MAX_BATCH_SIZE",
        ge=1,
        le=50_000,
        description="The most events one main-line batch applies: a batch is the whole backlog "
        "above the mark up to this, so a backlog becomes few large transactions and one score "
        "refresh per user per batch.",
    )
    ingest_batch_linger_seconds: float = Field(
        default=0.1,
        alias="INGEST_BATCH_LINGER_SECONDS",
        ge=0,
        le=5,
        description="How long the running watcher waits after a main-line batch before the "
        "next: the app claims the score refreshes the batch just published before the next "
        "batch holds them (which made one of the two rerun), and the events arriving meanwhile "
        "join the next batch. Adds at most this to an event's lag; 0 turns it off.",
    )
    score_refresh_burst_events_per_second: float = Field(
        default=200.0,
        alias="SCORE_REFRESH_BURST_EVENTS_PER_SECOND",
        ge=0,
        description="A user whose events arrived at this rate or faster over the last 2 "
        "seconds (by receipt) is in a burst: their new score refresh waits "
        "SCORE_REFRESH_BURST_DELAY_SECONDS, and the batches meanwhile coalesce into it. "
        "0 turns it off.",
    )
    score_refresh_burst_delay_seconds: float = Field(
        default=2.0,
        alias="SCORE_REFRESH_BURST_DELAY_SECONDS",
        ge=0,
        le=60,
        description="How long a bursting user's new score refresh waits before the app may "
        "claim it: what a burst adds to that user's lag. 0 turns it off.",
    )
    ingest_lease_seconds: float = Field(default=60.0, alias="INGEST_LEASE_SECONDS", gt=0)
    ingest_poll_interval_seconds: float = Field(
        default=1.0, alias="INGEST_POLL_INTERVAL_SECONDS", gt=0
    )
    ingest_gap_wait_seconds: float = Field(
        default=15.0,
        alias="INGEST_GAP_WAIT_SECONDS",
        gt=0,
        description="How long the watcher waits at an arrival number reserved by a request that "
        "has not stored its events yet, before applying later events. Longer than "
        "REQUEST_DB_TIMEOUT_SECONDS, after which no insert of that request can still land.",
    )
    key_resolve_grace_seconds: float = Field(
        default=900.0,
        alias="KEY_RESOLVE_GRACE_SECONDS",
        ge=0,
        description="How long an event whose API key telemetry does not know yet waits for the "
        "app's api_key_issued before it counts as the device's anonymous event.",
    )
    key_resolve_retry_seconds: float = Field(
        default=2.0,
        alias="KEY_RESOLVE_RETRY_SECONDS",
        gt=0,
        description="How soon an event waiting for its key is looked at again.",
    )
    # Commands are a few a day: poll rarely, the change stream wakes the consumer at once.
    command_poll_interval_seconds: float = Field(
        default=30.0, alias="COMMAND_POLL_INTERVAL_SECONDS", gt=0
    )
    # The command consumer waits nearly always: its stream is what an idle worker's costs most.
    command_stream_read_interval_seconds: float = Field(
        default=0.1,
        alias="COMMAND_STREAM_READ_INTERVAL_SECONDS",
        ge=0,
        le=1,
        description="After a read of the command consumer's change stream that brought "
        "nothing, how long from its start before the next (shared_contracts/wakeup.py): bounds "
        "what the idle consumer costs a busy server, and adds at most this to a command's "
        "wake-up while other writes keep it busy. 0 turns it off.",
    )
    backfill_batch_size: int = Field(default=500, alias="BACKFILL_BATCH_SIZE", ge=1, le=10_000)
    backfill_lease_seconds: float = Field(default=60.0, alias="BACKFILL_LEASE_SECONDS", gt=0)
    backfill_progress_seconds: float = Field(default=5.0, alias="BACKFILL_PROGRESS_SECONDS", gt=0)
    run_backfill: bool = Field(
        default=True,
        alias="TELEMETRY_RUN_BACKFILL",
        description="Run the one-time username_metrics backfill at start-up (with the workers).",
    )
    run_workers: bool = Field(
        default=True,
        alias="TELEMETRY_RUN_WORKERS",
        description="Run the ingest watcher and command consumer inside the API process.",
    )
