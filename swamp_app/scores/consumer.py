"""The score-refresh consumer on swamp_club_events: refreshes and their acks in one transaction.

The refreshes available together (up to SCORE_REFRESH_BATCH_SIZE: a watcher batch publishes one
per user it changed) are claimed and applied together, a handful of commands for the batch
instead of half a dozen per refresh. A batch that fails is retried one refresh at a time."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from prometheus_client import Counter, Histogram
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.messages import ScoreRefresh
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.consumer import Consumer, Delivery, ack_all
from swamp_app.runtime import AppRuntime
from swamp_app.scores.repository import Applied, apply_refresh, apply_refreshes

log = logging.getLogger(__name__)

REFRESHES = Counter("swamp_score_refreshes_total", "score_refresh messages by outcome", ["outcome"])
REFRESH_LAG = Histogram(
    "swamp_refresh_lag_seconds",
    "From the newest event's receipt at telemetry to its score being applied here",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)


def score_refresh_consumer(runtime: AppRuntime, *, worker: str | None = None) -> Consumer:
    history_cap = runtime.settings.score_history_cap

    async def handle(delivery: Delivery) -> None:
        refresh = delivery.message
        assert isinstance(refresh, ScoreRefresh)
        outcome: Applied = "stale"

        async def apply_and_ack(session: AsyncClientSession) -> None:
            nonlocal outcome
            outcome = await apply_refresh(
                runtime.db, refresh, history_cap=history_cap, session=session
            )
            await delivery.ack(session=session)

        await in_transaction(runtime.client, apply_and_ack)
        _observe(refresh, outcome)

    async def handle_batch(deliveries: list[Delivery]) -> None:
        refreshes = [d.message for d in deliveries if isinstance(d.message, ScoreRefresh)]
        assert len(refreshes) == len(deliveries), "only score_refresh is consumed here"
        outcomes: list[Applied] = []

        async def apply_and_ack(session: AsyncClientSession) -> None:
            outcomes[:] = await apply_refreshes(
                runtime.db, refreshes, history_cap=history_cap, session=session
            )
            await ack_all(deliveries, session=session)

        await in_transaction(runtime.client, apply_and_ack)
        for refresh, outcome in zip(refreshes, outcomes, strict=True):
            _observe(refresh, outcome)

    return Consumer(
        runtime.refreshes,
        handle,
        worker=worker,
        batch_handler=handle_batch,
        batch_size=runtime.settings.score_refresh_batch_size,
    )


def _observe(refresh: ScoreRefresh, outcome: Applied) -> None:
    REFRESHES.labels(outcome).inc()
    received = refresh.snapshot.get("lastEventReceivedAt")
    if outcome == "applied" and isinstance(received, datetime):
        REFRESH_LAG.observe(max(0.0, (datetime.now(UTC) - received).total_seconds()))
    if outcome == "unknown_user":
        # Deleted (or never registered here): nothing to score.
        log.info("score_refresh for unknown user %s acknowledged", refresh.userId)
