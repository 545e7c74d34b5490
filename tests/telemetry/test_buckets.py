"""The pure functions that turn one event into bucket counters: the day it counts for (the
server's clock, SPEC I12) and the command name it counts under (the CLI's vocabulary)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry_service.ingest.schemas import CliEvent
from telemetry_service.processing.buckets import (
    TRUSTED_FUTURE,
    TRUSTED_PAST,
    BucketDelta,
    seen_at,
    utc_day,
)
from tests.telemetry.conftest import cli_event

RECEIVED = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def event(started_at: str | None = None, **invocation: Any) -> CliEvent:
    raw = cli_event("dev")
    if started_at is None:
        del raw["properties"]["startedAt"]
    else:
        raw["properties"]["startedAt"] = started_at
    raw["properties"]["invocation"].update(invocation)
    return CliEvent.model_validate(raw)


def test_a_day_counts_from_started_at_inside_the_window() -> None:
    started = "2026-03-09T08:00:00.000Z"
    assert seen_at(event(started), RECEIVED) == datetime(2026, 3, 9, 8, tzinfo=UTC)


def test_the_window_edges_are_inclusive() -> None:
    earliest, latest = RECEIVED - TRUSTED_PAST, RECEIVED + TRUSTED_FUTURE
    assert seen_at(event(earliest.isoformat()), RECEIVED) == earliest
    assert seen_at(event(latest.isoformat()), RECEIVED) == latest
    just_before = (earliest - timedelta(milliseconds=1)).isoformat()
    just_after = (latest + timedelta(milliseconds=1)).isoformat()
    assert seen_at(event(just_before), RECEIVED) == RECEIVED
    assert seen_at(event(just_after), RECEIVED) == RECEIVED


def test_invented_dates_count_as_the_day_the_server_received_them() -> None:
    for started in (
        "0001-01-01T00:00:00Z",
        "1900-06-01T00:00:00Z",
        "2020-01-01T00:00:00Z",
        "2026-03-01T11:59:59Z",  # 9 days before
        "2026-03-10T12:05:01Z",  # 5 minutes and a second ahead
        "3000-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
    ):
        assert seen_at(event(started), RECEIVED) == RECEIVED, started
    assert seen_at(event(None), RECEIVED) == RECEIVED


def test_a_started_at_without_a_utc_value_falls_back_to_the_server_clock() -> None:
    # Stored before the door refused them: the watcher must still be able to count them.
    for started in ("9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+05:00"):
        assert seen_at(event(started), RECEIVED) == RECEIVED


def test_days_are_utc_days() -> None:
    late_evening = event("2026-03-01T23:30:00-05:00")
    received = datetime(2026, 3, 2, 6, tzinfo=UTC)
    moment = seen_at(late_evening, received)
    assert moment.utcoffset() == timedelta(0)
    assert utc_day(moment) == "2026-03-02"
    delta = BucketDelta()
    delta.add(late_evening, moment)
    assert delta.activeDays == {"2026-03-02"}
    # A naive server time is UTC.
    assert seen_at(event(None), datetime(2026, 3, 2, 1)) == datetime(2026, 3, 2, 1, tzinfo=UTC)


offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
received_times = st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC))
started_times = st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=offsets)


@settings(max_examples=300)
@given(received_times, started_times)
def test_the_day_is_always_within_the_window_and_utc(received: datetime, started: datetime) -> None:
    moment = seen_at(event(started.isoformat()), received)
    assert moment.tzinfo is UTC
    assert received - TRUSTED_PAST <= moment <= received + TRUSTED_FUTURE
    # Either the client's instant (when trusted) or the server's.
    assert moment in (started, received)
    if received - TRUSTED_PAST <= started <= received + TRUSTED_FUTURE:
        assert moment == started
    assert utc_day(moment) == moment.astimezone(UTC).strftime("%Y-%m-%d")


@settings(max_examples=200)
@given(received_times, st.timedeltas(-TRUSTED_PAST, TRUSTED_FUTURE), offsets)
def test_any_offset_of_a_trusted_instant_counts_for_the_same_utc_day(
    received: datetime, skew: timedelta, offset: timezone
) -> None:
    instant = received + skew
    local = seen_at(event(instant.astimezone(offset).isoformat()), received)
    assert local == instant
    assert utc_day(local) == instant.date().isoformat()
