"""Queue counters, exported in Prometheus format by each service's /metrics."""

from prometheus_client import Counter

PUBLISHED = Counter(
    "swamp_queue_published_total", "Messages published (coalesced ones included)", ["queue", "type"]
)
OUTCOMES = Counter(
    "swamp_queue_outcomes_total",
    "What happened to claimed messages: done, retried, dead, released, parked, lost_lease",
    ["queue", "outcome"],
)
REAPED = Counter("swamp_queue_reaped_total", "Expired claims returned to pending", ["queue"])
