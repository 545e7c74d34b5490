"""The pure functions that turn one event into bucket counters: the day it counts for (the
server's clock, SPEC I12) and the command name it counts under (the CLI's vocabulary)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from telemetry_service.devices import cli_commands
from telemetry_service.devices.buckets import (
    TRUSTED_FUTURE,
    TRUSTED_PAST,
    BucketDelta,
    seen_at,
    utc_day,
)
from telemetry_service.ingest.schemas import CliEvent
from tests.telemetry.conftest import Telemetry, cli_event

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
    # The door refuses these now; seen_at stays total for any datetime all the same.
    for started in (
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
        datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=5))),
    ):
        unvalidated = event(None)
        unvalidated.properties.startedAt = started
        assert seen_at(unvalidated, RECEIVED) == RECEIVED


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


# --- command names from the CLI's vocabulary -------------------------------------------------


@pytest.mark.parametrize(
    ("command", "subcommand", "key", "unknown"),
    [
        ("model", "create", "model create", None),
        ("workflow", "run", "workflow run", None),
        ("vault", "read-secret", "vault read-secret", None),
        ("model", None, "model", None),
        ("model", "", "model", None),
        ("model", "frobnicate", "model", "subcommand"),  # a newer CLI's subcommand
        ("init", "my-repo", "init", None),  # init takes a value there, never a subcommand
        ("version", "--json", "version", None),
        ("frobnicate", None, "other", "command"),
        ("my-secret-project", "x", "other", "command"),
        ("Model", "create", "other", "command"),
        ("", None, "(none)", None),
    ],
)
def test_words_count_by_name_only_when_the_cli_tree_has_them(
    command: str, subcommand: str | None, key: str, unknown: str | None
) -> None:
    assert cli_commands.classify(command, subcommand) == (key, unknown)


def test_the_tree_is_the_cli_s_at_commit_06b61472() -> None:
    tree = cli_commands.COMMANDS
    assert len(tree) == 27
    assert tree["init"] == frozenset()
    assert tree["help"] == frozenset()
    assert len(tree["extension"]) == 19
    assert {"read-secret", "list-keys", "audit-trail"} <= tree["vault"]
    assert tree["telemetry"] == {"stats"}
    assert cli_commands.OTHER not in tree


def test_the_tree_is_easy_to_extend_and_refuses_what_is_not_a_word() -> None:
    newer = cli_commands.parse_tree(cli_commands.CLI_COMMAND_TREE + "garden: plant\n")
    assert cli_commands.classify("garden", "plant", newer) == ("garden plant", None)
    assert cli_commands.classify("garden", "plant") == ("other", "command")
    for bad in ("model: a.b", "$x: y", "model: create\nmodel: get", "other: x", "Caps"):
        with pytest.raises(ValueError, match="line"):
            cli_commands.parse_tree(bad)


words = st.one_of(
    st.sampled_from(sorted({w for c, subs in cli_commands.COMMANDS.items() for w in (c, *subs)})),
    st.text(max_size=12),
)


@settings(max_examples=300)
@given(words, st.one_of(st.none(), words))
def test_every_key_is_from_the_tree(command: str, subcommand: str | None) -> None:
    key, unknown = cli_commands.classify(command, subcommand)
    tree = cli_commands.COMMANDS
    first, _, second = key.partition(" ")
    assert first in tree or key in (cli_commands.OTHER, cli_commands.NO_COMMAND)
    assert not second or second in tree[first]
    assert not set(key) & {".", "$", "\x00"}  # a safe field name, whatever was sent
    if command in tree and (not subcommand or subcommand in tree[command]):
        assert key == " ".join(filter(None, (command, subcommand)))
    assert (unknown == "command") == (bool(command) and command not in tree)


def unknown_words(position: str, command: str) -> float:
    labels = {"position": position, "command": command}
    return REGISTRY.get_sample_value("swamp_ingest_unknown_command_words_total", labels) or 0.0


async def test_invented_words_are_counted_on_metrics_not_in_public_counters(
    telemetry: Telemetry,
) -> None:
    before = (unknown_words("command", "other"), unknown_words("subcommand", "model"))
    sent = [("model", "create"), ("init", "my-secret-repo"), ("model", "frobnicate")]
    sent += [(f"invented-{n}", None) for n in range(3)]
    events = []
    for command, subcommand in sent:
        event = cli_event("dev-words", command=command)
        event["properties"]["invocation"]["subcommand"] = subcommand
        events.append(event)
    assert (await telemetry.post({"events": events})).status_code == 202
    await telemetry.drain()
    device = await telemetry.device("dev-words")
    counts = device.json()["anonymous"]["commandCounts"]
    assert counts == {"model create": 1, "init": 1, "model": 1, "other": 3}
    after = (unknown_words("command", "other"), unknown_words("subcommand", "model"))
    assert (after[0] - before[0], after[1] - before[1]) == (3, 1)
    exposed = (await telemetry.http.get("/metrics")).text
    assert (
        'swamp_ingest_unknown_command_words_total{command="other",position="command",'
        'service="telemetry"}' in exposed
    )
    assert "invented" not in exposed
    assert "my-secret-repo" not in exposed


def test_every_summed_counter_of_the_model_is_counted_and_nothing_else() -> None:
    """The counters are listed once (devices/models.py); an event's counts cover exactly them."""
    from telemetry_service.devices.buckets import event_counts
    from telemetry_service.devices.models import SUMMED
    from telemetry_service.ingest.schemas import CliEvent
    from tests.telemetry.conftest import cli_event

    assert set(event_counts(CliEvent.model_validate(cli_event("d")))) == set(SUMMED)


def test_a_delta_holds_integers_for_the_database() -> None:
    from telemetry_service.devices.buckets import BucketDelta
    from telemetry_service.ingest.schemas import CliEvent
    from tests.telemetry.conftest import cli_event

    delta = BucketDelta()
    delta.add(CliEvent.model_validate(cli_event("d")), datetime.now(UTC))
    increments = delta.update_operators("anon")["$inc"].values()
    assert all(type(n) is int for n in increments)
