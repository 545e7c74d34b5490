"""The score-refresh consumer on swamp_club_events: the refresh and its ack in one transaction."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from prometheus_client import Counter, Histogram
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts.messages import ScoreRefresh
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.consumer import Consumer, Delivery
from swamp_app.runtime import AppRuntime
from swamp_app.scores.repository import apply_refresh

log = logging.getLogger(__name__)

REFRESHES = Counter("swamp_score_refreshes_total", "score_refresh messages by outcome", ["outcome"])
REFRESH_LAG = Histogram(
    "swamp_refresh_lag_seconds",
    "From the newest event's receipt at telemetry to its score being applied here",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)


def score_refresh_consumer(runtime: AppRuntime, *, worker: str | None = None) -> Consumer:
    async def handle(delivery: Delivery) -> None:
        refresh = delivery.message
        assert isinstance(refresh, ScoreRefresh)
        outcome = "stale"

        async def apply_and_ack(session: AsyncClientSession) -> None:
            nonlocal outcome
            outcome = await apply_refresh(
                runtime.db,
                refresh,
                history_cap=runtime.settings.score_history_cap,
                session=session,
            )
            await delivery.ack(session=session)

        await in_transaction(runtime.client, apply_and_ack)
        REFRESHES.labels(outcome).inc()
        received = refresh.snapshot.get("lastEventReceivedAt")
        if outcome == "applied" and isinstance(received, datetime):
            REFRESH_LAG.observe(max(0.0, (datetime.now(UTC) - received).total_seconds()))
        if outcome == "unknown_user":
            # Deleted (or never registered here): nothing to score.
            log.info("score_refresh for unknown user %s acknowledged", refresh.userId)

    return Consumer(runtime.refreshes, handle, worker=worker)
