"""Each service's own /metrics: only the series it owns, each labelled with its service.

The metrics are process-global (prometheus_client's default registry), and `swamp-club up` runs
both services in one process: both ports served every series, so scraping both double-counted.
Each app now exposes a registry of its own holding one collector that selects, from the global
registry, what the service owns: its HTTP series, its own families (by prefix), the queue it
publishes to (published counts) and the queue it consumes (outcomes, reaps, depth, age), plus the
process series. Every sample carries ``service``, so two targets never serve the same series.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

#: Families whose samples are selected by their ``queue`` label: the publisher's, the consumer's.
PUBLISHER_FAMILIES = ("swamp_queue_published",)
CONSUMER_FAMILIES = (
    "swamp_queue_outcomes",
    "swamp_queue_reaped",
    "swamp_queue_messages",
    "swamp_queue_oldest_pending_seconds",
)


@dataclass(frozen=True, slots=True)
class MetricsScope:
    service: str
    #: Name prefixes of the families only this service writes (e.g. ``swamp_ingest_``).
    prefixes: tuple[str, ...]
    publishes_to: str
    consumes: str

    def owns(self, family: str, labels: dict[str, str]) -> bool:
        if family in PUBLISHER_FAMILIES:
            return labels.get("queue") == self.publishes_to
        if family in CONSUMER_FAMILIES:
            return labels.get("queue") == self.consumes
        if "service" in labels:
            return labels["service"] == self.service
        if family.startswith("swamp_"):
            return family.startswith(self.prefixes)
        return True  # process_*, python_*: this process, labelled with the service below


class ServiceCollector(Collector):
    def __init__(self, scope: MetricsScope, source: CollectorRegistry = REGISTRY) -> None:
        self.scope = scope
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                if self.scope.owns(family.name, sample.labels):
                    labels = {**sample.labels, "service": self.scope.service}
                    kept.samples.append(sample._replace(labels=labels))
            if kept.samples:
                yield kept


def service_registry(scope: MetricsScope) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(scope))
    return registry
