"""A user whose events come faster than SCORE_REFRESH_BURST_EVENTS_PER_SECOND: their refresh
waits SCORE_REFRESH_BURST_DELAY_SECONDS, and the batches meanwhile coalesce into it
(processing/bursts.py). Everyone else's refreshes go at once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared_contracts.queue.documents import PENDING
from telemetry_service.devices.store import AttributedEvent
from telemetry_service.ingest.schemas import CliEvent
from telemetry_service.processing import watcher as watcher_module
from telemetry_service.processing.bursts import BurstWatch
from telemetry_service.processing.watcher import IngestWatcher
from telemetry_service.runtime import TelemetryRuntime
from tests.telemetry.conftest import Telemetry, cli_event

T0 = datetime(2026, 12, 4, 12, tzinfo=UTC)
EVENT = CliEvent.model_validate(cli_event("d"))


def events(
    user: str | None, device: str, count: int, *, over: float, start: float = 0.0
) -> list[AttributedEvent]:
    """``count`` events received evenly over ``over`` seconds from ``start``."""
    step = over / max(count - 1, 1)
    return [
        AttributedEvent(f"{device}-{start}-{n}", EVENT.model_copy(update={"distinct_id": device}),
                        user, T0 + timedelta(seconds=start + n * step), n)
        for n in range(count)
    ]  # fmt: skip


def watch() -> BurstWatch:
    return BurstWatch(events_per_second=200)  # over the span of the last 2 s, at least 1 s


@pytest.mark.parametrize(
    ("count", "over", "bursting"),
    [
        (200, 0.0, True),  # all at once: one moment of a second's worth
        (199, 0.0, False),
        (199, 1.0, False),
        (201, 0.5, True),  # the first half second of a burst is one already
        (300, 1.4, True),
        (401, 2.0, True),  # 400 before the newest, over 2 s
        (400, 2.0, False),  # 399 of them
        (370, 1.9, False),  # 195 a second
        (450, 2.5, False),  # at most 360 of them within 2 s
        (20_000, 300.0, False),  # a backlog applied at once: the events came at 67 a second
    ],
)
def test_a_burst_is_the_user_s_events_received_within_the_window(
    count: int, over: float, bursting: bool
) -> None:
    found = watch().bursting(events("u", "d", count, over=over), owners={})
    assert found == ({"u"} if bursting else set())


def test_a_burst_is_judged_across_batches_and_a_batch_tried_again_counts_once() -> None:
    bursts = watch()
    first = events("u", "d", 150, over=0.3)
    assert bursts.bursting(first, owners={}) == set()
    assert bursts.bursting(first, owners={}) == set()  # its transaction ran again
    assert bursts.bursting(events("u", "d", 150, over=0.3, start=0.5), owners={}) == {"u"}
    # Three seconds later, what came before is out of the window.
    assert bursts.bursting(events("u", "d", 150, over=0.3, start=3.5), owners={}) == set()


def test_a_batch_cut_in_halves_or_tried_again_with_fewer_events_counts_each_event_once() -> None:
    """What the watcher does with a batch that fails after its users were judged (the whole,
    then its halves, around a failing event) or whose rerun finds fewer events ready: 190
    events in 0.3 s stay below 200 in a second however often they are seen."""
    bursts = watch()
    batch = events("u", "d", 190, over=0.3)
    batch.reverse()  # the smallest id last: ids are the client's
    assert bursts.bursting(batch, owners={}) == set()  # the whole: aborted
    assert bursts.bursting(batch[:95], owners={}) == set()
    assert bursts.bursting(batch[95:], owners={}) == set()
    assert bursts.bursting(batch[1:], owners={}) == set()


def test_one_event_stamped_ahead_moves_no_one_else_s_window() -> None:
    """receivedAt is the receiving ingest replica's clock: one event an hour ahead (a replica
    whose clock is off) in a batch must not drop the other users' windows."""
    bursts = watch()
    assert bursts.bursting(events("u", "d", 150, over=0.3), owners={}) == set()
    ahead = events("x", "skewed", 1, over=0.0, start=3600.0)
    later = events("u", "d", 150, over=0.3, start=0.5)
    assert bursts.bursting(ahead + later, owners={}) == {"u"}


def test_ordinary_traffic_bunched_into_one_batch_is_no_burst() -> None:
    """The bench's users send 40 events a second in requests of 25, and one batch may hold
    several of them: here 100 a second, every second's in one batch."""
    bursts = watch()
    for second in range(30):
        batch = events("u", "d", 100, over=0.2, start=float(second))
        assert bursts.bursting(batch, owners={}) == set()


def test_anonymous_events_count_for_their_device_s_owner_and_a_rate_of_zero_is_off() -> None:
    batch = events(None, "owned", 111, over=0.5) + events("u", "mine", 91, over=0.5)
    batch += events(None, "nobody-s", 1000, over=0.5)
    assert watch().bursting(batch, owners={"owned": "u"}) == {"u"}
    assert watch().bursting(batch, owners={}) == set()
    assert BurstWatch(events_per_second=0).bursting(batch, owners={"owned": "u"}) == set()


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
    await telemetry.post({"events": [cli_event("burst-dev") for _ in range(450)]}, burst_key)
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
    assert after["snapshot"]["successCount"] == 480


async def test_a_failing_event_does_not_make_its_calm_neighbour_a_burst(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """190 events of one user (below 200 within a second) share a batch with another user's
    event whose projection cannot be written: the batch is moved aside and cut in halves to
    isolate it (I11), and every attempt sees the calm user's events again. They count once: the calm
    user's refresh goes at once."""
    calm, calm_key = await telemetry.register("calm")
    poison, poison_key = await telemetry.register("poison")
    await app_applies_what_is_available(telemetry)
    real = watcher_module.write_projections

    async def write_projections(**kwargs: Any) -> int:
        if poison in kwargs["reasons"]:
            raise ValueError("this user's projection cannot be written")
        return int(await real(**kwargs))

    monkeypatch.setattr(watcher_module, "write_projections", write_projections)
    ids = [str(uuid.UUID(int=10**9 - n)) for n in range(190)]  # the smallest id last
    await telemetry.post({"events": [cli_event("calm-dev", event_id=i) for i in ids]}, calm_key)
    await telemetry.post({"events": [cli_event("poison-dev")]}, poison_key)
    watcher = replica(telemetry, ingest_batch_size=1000, ingest_max_batch_size=1000,
                      score_refresh_burst_delay_seconds=30.0)  # fmt: skip
    await watcher.drain()

    refresh = await pending_refresh(telemetry, calm)
    assert refresh["snapshot"]["successCount"] == 190
    assert refresh["availableAt"] <= datetime.now(UTC) + timedelta(seconds=1)


@pytest.mark.parametrize("off", [{"score_refresh_burst_events_per_second": 0.0},
                                 {"score_refresh_burst_delay_seconds": 0.0}])  # fmt: skip
async def test_either_setting_at_zero_turns_the_delay_off(
    telemetry: Telemetry, off: dict[str, float]
) -> None:
    burst, burst_key = await telemetry.register("burst")
    await app_applies_what_is_available(telemetry)
    watcher = replica(telemetry, ingest_batch_size=1000, ingest_max_batch_size=1000, **off)
    await telemetry.post({"events": [cli_event("burst-dev") for _ in range(450)]}, burst_key)
    await watcher.drain()
    assert (await pending_refresh(telemetry, burst))["availableAt"] <= datetime.now(UTC)
