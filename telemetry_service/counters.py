"""Prometheus counters of the telemetry service (exported at /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS_RECEIVED = Counter(
    "swamp_ingest_events_total", "Events received by POST /ingest", ["outcome"]
)
EVENTS_PROCESSED = Counter("swamp_ingest_events_processed_total", "Events applied by the watcher")
BATCHES = Counter("swamp_ingest_batches_total", "Watcher batches", ["outcome"])
BATCH_SECONDS = Histogram("swamp_ingest_batch_seconds", "Time to apply one watcher batch")
SHARED_DEVICE = Counter(
    "swamp_ingest_shared_device_total",
    "A second user authenticated on a device owned by another user (recorded, never merged)",
)
KEY_RESOLUTIONS = Counter(
    "swamp_ingest_key_resolutions_total",
    "How each event's key resolved when it was applied (I10): user, no_key, revoked, "
    "unknown (grace period over: counted as no key), waiting (not known yet, retried)",
    ["outcome"],
)
UNKNOWN_COMMAND_WORDS = Counter(
    "swamp_ingest_unknown_command_words_total",
    "Command words outside the CLI's command tree (a newer CLI?), counted under 'other' or under"
    " their known command; labelled by position and known command, never by the word itself",
    ["position", "command"],
)
EVENTS_DEAD = Counter(
    "swamp_ingest_events_dead_total",
    "Events set aside: unreadable, or failing alone max attempts (kept, retryable)",
)
EVENTS_SET_ASIDE = Gauge(
    "swamp_ingest_events_set_aside",
    "Events set aside now, waiting for an operator (swamp-club events dead); read at scrape",
)
BURST_REFRESHES_DELAYED = Counter(
    "swamp_ingest_burst_refreshes_delayed_total",
    "Score refreshes published to wait SCORE_REFRESH_BURST_DELAY_SECONDS (per batch attempt): "
    "their user's events came at SCORE_REFRESH_BURST_EVENTS_PER_SECOND or faster",
)
PROJECTION_WRITES = Counter(
    "swamp_projection_writes_total",
    "username_metrics writes (each publishes a refresh)",
    ["reason"],
)
