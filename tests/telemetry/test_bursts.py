"""A user whose events come faster than SCORE_REFRESH_BURST_EVENTS_PER_SECOND: their refresh
waits SCORE_REFRESH_BURST_DELAY_SECONDS, and the batches meanwhile coalesce into it
(processing/bursts.py). Everyone else's refreshes go at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared_contracts.queue.documents import PENDING
from telemetry_service.devices.store import AttributedEvent
from telemetry_service.ingest.schemas import CliEvent
from telemetry_service.processing.bursts import bursting_users
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from tests.telemetry.conftest import Telemetry, cli_event

T0 = datetime(2026, 12, 4, 12, tzinfo=UTC)
EVENT = CliEvent.model_validate(cli_event("d"))


def events(user: str | None, device: str, count: int, *, over: float) -> list[AttributedEvent]:
    """``count`` events received evenly over ``over`` seconds."""
    step = over / max(count - 1, 1)
    return [
        AttributedEvent(f"{device}-{n}", EVENT.model_copy(update={"distinct_id": device}), user,
                        T0 + timedelta(seconds=n * step), n)
        for n in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("count", "over", "bursting"),
    [
        (100, 0.0, True),  # one request: judged over a second, so by its count
        (99, 0.0, False),
        (100, 1.0, True),
        (250, 2.4, True),  # 104 a second
        (250, 2.6, False),  # 96 a second
        (20_000, 300.0, False),  # a backlog applied at once: the events came at 67 a second
    ],
)
def test_a_burst_is_a_rate_over_a_second_at_the_least(
    count: int, over: float, bursting: bool
) -> None:
    found = bursting_users(events("u", "d", count, over=over), owners={}, events_per_second=100)
    assert found == ({"u"} if bursting else set())


def test_anonymous_events_count_for_their_device_s_owner_and_a_rate_of_zero_is_off() -> None:
    batch = events(None, "owned", 60, over=0.5) + events("u", "mine", 40, over=0.5)
    batch += events(None, "nobody-s", 500, over=0.5)
    assert bursting_users(batch, owners={"owned": "u"}, events_per_second=100) == {"u"}
    assert bursting_users(batch, owners={}, events_per_second=100) == set()
    assert bursting_users(batch, owners={"owned": "u"}, events_per_second=0) == set()


def replica(telemetry: Telemetry, **overrides: Any) -> IngestWatcher:
    settings = telemetry.runtime.settings.model_copy(update=overrides)
    return IngestWatcher(TelemetryRuntime(settings=settings, client=telemetry.runtime.client))


async def pending_refresh(telemetry: Telemetry, user_id: str) -> dict[str, Any]:
    found = await telemetry.runtime.refreshes.collection.find(
        {"userId": user_id, "status": PENDING}
    ).to_list()
    assert len(found) == 1, found
    return found[0]


async def app_applies_what_is_available(telemetry: Telemetry) -> None:
    """As the app's consumer does (the registrations' refreshes, here)."""
    queue = telemetry.runtime.refreshes
    for claim in await queue.claim_many(worker="app", limit=100):
        assert await queue.ack(claim)


async def test_a_burst_user_s_refresh_waits_and_the_next_batches_coalesce_into_it(
    telemetry: Telemetry,
) -> None:
    burst, burst_key = await telemetry.register("burst")
    calm, calm_key = await telemetry.register("calm")
    await app_applies_what_is_available(telemetry)
    watcher = replica(telemetry, ingest_batch_size=1000, ingest_max_batch_size=1000,
                      score_refresh_burst_delay_seconds=30.0)  # fmt: skip
    await telemetry.post({"events": [cli_event("burst-dev") for _ in range(150)]}, burst_key)
    await telemetry.post({"events": [cli_event("calm-dev") for _ in range(5)]}, calm_key)
    before = datetime.now(UTC)
    await watcher.drain()

    waiting = await pending_refresh(telemetry, burst)
    assert waiting["availableAt"] >= before + timedelta(seconds=29)
    assert (await pending_refresh(telemetry, calm))["availableAt"] <= datetime.now(UTC)

    # The burst goes on below the rate (30 events): its next batch coalesces into the waiting
    # refresh, newest snapshot, same time.
    await telemetry.post({"events": [cli_event("burst-dev") for _ in range(30)]}, burst_key)
    await watcher.drain()
    after = await pending_refresh(telemetry, burst)
    assert after["_id"] == waiting["_id"]
    assert after["availableAt"] == waiting["availableAt"]
    assert after["projectionVersion"] == waiting["projectionVersion"] + 1
    assert after["snapshot"]["successCount"] == 180


@pytest.mark.parametrize("off", [{"score_refresh_burst_events_per_second": 0.0},
                                 {"score_refresh_burst_delay_seconds": 0.0}])  # fmt: skip
async def test_either_setting_at_zero_turns_the_delay_off(
    telemetry: Telemetry, off: dict[str, float]
) -> None:
    burst, burst_key = await telemetry.register("burst")
    await app_applies_what_is_available(telemetry)
    watcher = replica(telemetry, ingest_batch_size=1000, ingest_max_batch_size=1000, **off)
    await telemetry.post({"events": [cli_event("burst-dev") for _ in range(150)]}, burst_key)
    await watcher.drain()
    assert (await pending_refresh(telemetry, burst))["availableAt"] <= datetime.now(UTC)
