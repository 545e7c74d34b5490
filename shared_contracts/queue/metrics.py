"""Queue counters and gauges, exported in Prometheus format by each service's /metrics."""

from typing import Any

from prometheus_client import Counter, Gauge
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.names import QUEUE_COLLECTIONS

PUBLISHED = Counter(
    "swamp_queue_published_total", "Messages published (coalesced ones included)", ["queue", "type"]
)
OUTCOMES = Counter(
    "swamp_queue_outcomes_total",
    "What happened to claimed messages: done, retried, dead, released, parked, lost_lease",
    ["queue", "outcome"],
)
REAPED = Counter("swamp_queue_reaped_total", "Expired claims returned to pending", ["queue"])

QUEUE_DEPTH = Gauge("swamp_queue_messages", "Messages on a queue by status", ["queue", "status"])
QUEUE_OLDEST_PENDING = Gauge(
    "swamp_queue_oldest_pending_seconds", "Age of the oldest claimable pending message", ["queue"]
)


async def update_queue_gauges(bus: AsyncDatabase[dict[str, Any]]) -> None:
    """Read at scrape time: queue depth per status and the oldest pending age, per queue."""
    from shared_contracts.queue.admin import queue_stats
    from shared_contracts.queue.engine import utcnow

    for name in QUEUE_COLLECTIONS:
        stats = await queue_stats(bus[name], now=utcnow())
        for status, count in stats["byStatus"].items():
            QUEUE_DEPTH.labels(name, status).set(count)
        QUEUE_OLDEST_PENDING.labels(name).set(stats["oldestPendingAgeSeconds"] or 0)
