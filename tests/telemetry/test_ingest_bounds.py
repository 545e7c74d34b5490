"""Bounds at the door (SPEC I11, I12): whatever /ingest answers 202 for, the watcher can apply.

Numbers we sum are clamped so no sum can overflow; timestamps must have a UTC value; DBRef
field names are refused (other ``$`` names are kept as sent). Each refusal is a 422 naming the
event's index and field, and nothing of the request is stored.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from telemetry_service.collections import EVENTS
from telemetry_service.devices.buckets import (
    TRUSTED_FUTURE,
    TRUSTED_PAST,
    BucketDelta,
    seen_at,
)
from telemetry_service.ingest.schemas import MAX_DURATION_MS, CliEvent
from tests.support import unapplied_events
from tests.telemetry.conftest import CLI_EVENT, Telemetry, cli_event

INT64_MAX = 2**63 - 1


async def stored_ids(telemetry: Telemetry, events: list[dict[str, Any]]) -> int:
    ids = [e["properties"]["id"] for e in events]
    return await telemetry.runtime.db[EVENTS].count_documents({"_id": {"$in": ids}})


def with_property(name: str, value: Any) -> dict[str, Any]:
    event = cli_event(f"dev-{uuid.uuid4().hex[:8]}")
    event["properties"][name] = value
    return event


async def test_durations_that_would_overflow_a_sum_are_counted_as_seven_days(
    telemetry: Telemetry,
) -> None:
    # Issue 15: 2^62 twice passes int64, and 2^63-1 makes every later event of the device fail.
    _, key = await telemetry.register("victim")
    huge = [with_property("durationMs", d) for d in (2**62, 2**62, INT64_MAX)]
    for event in huge:
        event["distinct_id"] = "shared-dev"
    innocent = [cli_event("shared-dev") for _ in range(5)]  # durationMs 447 each
    assert (await telemetry.post({"events": [*huge, *innocent]}, key)).status_code == 202
    await telemetry.drain()
    stats = await telemetry.stats("victim")
    assert stats["totalInvocations"] == 8
    assert stats["durationMsTotal"] == 3 * MAX_DURATION_MS + 5 * 447
    # The raw event keeps what the client sent; only the sum is bounded.
    raw = await telemetry.runtime.db[EVENTS].find_one({"_id": huge[2]["properties"]["id"]})
    assert raw["raw"]["properties"]["durationMs"] == INT64_MAX
    # And later events of the device still count.
    assert (await telemetry.post(cli_event("shared-dev"), key)).status_code == 202
    await telemetry.drain()
    assert (await telemetry.stats("victim"))["totalInvocations"] == 9


def test_the_duration_bound_keeps_every_plausible_sum_far_below_int64() -> None:
    assert MAX_DURATION_MS == 7 * 24 * 3600 * 1000
    # Overflowing one user's sum takes 15 billion events, every one at the bound: a year of the
    # whole service's measured throughput (about 500 events/s) spent on that user alone.
    assert INT64_MAX // MAX_DURATION_MS > 15_000_000_000
    # One event a second for a century, every one at the bound, stays 4x below int64.
    century = 3600 * 24 * 366 * 100
    assert century * MAX_DURATION_MS * 4 < INT64_MAX


@pytest.mark.parametrize("field", ["startedAt", "completedAt"])
@pytest.mark.parametrize(
    "value",
    [
        "9999-12-31T23:00:00-05:00",  # after 9999-12-31T23:59:59.999Z in UTC
        "0001-01-01T00:30:00+05:00",  # before year 1 in UTC
    ],
)
async def test_a_time_without_a_utc_value_is_422_naming_index_and_field(
    telemetry: Telemetry, field: str, value: str
) -> None:
    good, bad = cli_event("d"), with_property(field, value)
    response = await telemetry.post({"events": [good, bad]})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["index"] == 1
    assert detail["loc"] == f"events[1].properties.{field}"
    assert "UTC" in detail["msg"]
    assert await stored_ids(telemetry, [good, bad]) == 0


@pytest.mark.parametrize(
    ("extra", "loc"),
    [
        ({"$ref": "x", "$id": 1}, "properties.extra.$ref"),
        ({"$id": 1}, "properties.extra.$id"),
        ({"a": [{"b": {"$ref": "users", "$id": "u1", "$db": "swamp_club"}}]}, "properties.extra.a"),
        ({"$db": "x"}, "properties.extra.$db"),
    ],
)
async def test_dbref_shapes_are_422_naming_the_field(
    telemetry: Telemetry, extra: dict[str, Any], loc: str
) -> None:
    # Issue 15: {"$ref", "$id"} was stored, came back from the database as a DBRef and failed
    # re-validation in the watcher, taking its whole batch with it.
    good, bad = cli_event("d"), with_property("extra", extra)
    response = await telemetry.post({"events": [good, bad]})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["index"] == 1
    assert detail["loc"].startswith(f"events[1].{loc}")
    assert "DBRef" in detail["msg"]
    assert await stored_ids(telemetry, [good, bad]) == 0


async def test_other_dollar_names_are_kept_and_read_back_unchanged(telemetry: Telemetry) -> None:
    extra = {"$repo_id": "r", "$set": {"$inc": 1}, "$where": 2}
    event = with_property("extra", {**extra, "$refs": {"$ids": 1}, "ref": {"id": 1}})
    assert (await telemetry.post(event)).status_code == 202
    doc = await telemetry.runtime.db[EVENTS].find_one({"_id": event["properties"]["id"]})
    assert doc["raw"] == event
    assert CliEvent.model_validate(doc["raw"]).properties.model_extra["extra"]["$set"] == {
        "$inc": 1
    }


async def test_accepted_extremes_are_all_applied_with_an_innocent_batch(
    telemetry: Telemetry,
) -> None:
    """What the door now accepts, mixed with innocent events, is applied in one pass: nothing
    fails, nothing dies, and no day lands outside the server's window."""
    _, key = await telemetry.register("bystander")
    device = "dev-mixed"
    odd = [
        with_property("durationMs", INT64_MAX),
        with_property("startedAt", "9999-12-31T23:59:59.999Z"),
        with_property("startedAt", "0001-01-01T00:00:00+00:00"),
        with_property("completedAt", "1900-01-01T00:00:00-12:00"),
        with_property("extra", {"$repo_id": "x", "a.b": {"$c": [1, {"$d": None}]}}),
        with_property("durationMs", 0),
    ]
    odd[-1]["properties"]["invocation"] |= {"command": "my-own-thing", "subcommand": "secret"}
    innocent = [cli_event(device) for _ in range(10)]
    for event in odd:
        event["distinct_id"] = device
    before = datetime.now(UTC)
    response = await telemetry.post({"events": [*odd[:3], *innocent, *odd[3:]]}, key)
    assert response.status_code == 202, response.text
    await telemetry.drain()
    after = datetime.now(UTC)
    events = telemetry.runtime.db[EVENTS]
    assert await unapplied_events(events.database) == 0
    assert await events.count_documents({"dead": True}) == 0
    stats = await telemetry.stats("bystander")
    assert stats["totalInvocations"] == 16
    assert stats["commandCounts"] == {"model create": 15, "other": 1}
    # Every startedAt above is outside the window: all count for the UTC day of receipt.
    days = {d.date().isoformat() for d in (before, after)}
    body = (await telemetry.device(device)).json()
    bucket = next(iter(body["users"].values()))
    assert set(bucket["activeDays"]) <= days
    assert before - timedelta(seconds=1) <= datetime.fromisoformat(bucket["firstSeenAt"])
    assert datetime.fromisoformat(bucket["lastSeenAt"]) <= after + timedelta(seconds=1)


# --- the property: anything answered 202 round-trips and can be applied ------------------------

offsets = st.integers(-24 * 60 + 1, 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
timestamps = st.one_of(
    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59), timezones=offsets).map(
        datetime.isoformat
    ),
    st.sampled_from(
        [
            "9999-12-31T23:00:00-05:00",
            "0001-01-01T00:30:00+05:00",
            "2026-03-01T23:30-05:00",
            "2026-09-14T08:01:02.003Z",
            "2026-09-14T08:01:02",  # no offset: not an instant
            "not a date",
        ]
    ),
    st.integers(-(2**40), 2**40),
)
numbers = st.one_of(
    st.integers(-10, 10),
    st.integers(2**31 - 2, 2**31 + 2),
    st.integers(2**62 - 1, 2**64),
    st.sampled_from([INT64_MAX, -(2**63), MAX_DURATION_MS, MAX_DURATION_MS + 1]),
    st.floats(allow_nan=False, allow_infinity=False),
)
keys = st.one_of(
    st.sampled_from(["$ref", "$id", "$db", "$repo_id", "$where", "$", "a.b", "", "_id", "ünï🐸"]),
    st.text(max_size=6),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=10) | timestamps,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=10,
)
words = st.sampled_from(["model", "create", "init", "my-repo", "", "$x", "a.b"]) | st.text(
    max_size=8
)
overrides = st.fixed_dictionaries(
    {},
    optional={
        "durationMs": numbers,
        "startedAt": timestamps,
        "completedAt": timestamps,
        "extra": json_values,
        "$repo_id": json_values,
        "invocationContext": st.dictionaries(keys, json_values, max_size=3),
        "command": words,
        "subcommand": st.none() | words,
    },
)


def hostile_event(changes: dict[str, Any]) -> dict[str, Any]:
    event = copy.deepcopy(CLI_EVENT)
    event_id = str(uuid.uuid4())
    event |= {"insert_id": event_id, "distinct_id": f"prop-{event_id}"}
    properties = event["properties"]
    properties["id"] = event_id
    for name, value in changes.items():
        if name in ("command", "subcommand"):
            properties["invocation"][name] = value
        else:
            properties[name] = value
    return event


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(overrides, min_size=1, max_size=3))
async def test_anything_answered_202_reads_back_unchanged_and_can_be_applied(
    telemetry: Telemetry, changes: list[dict[str, Any]]
) -> None:
    events = [hostile_event(c) for c in changes]
    response = await telemetry.post({"events": events} if len(events) > 1 else events[0])
    assert response.status_code in (202, 422), response.text
    hypothesis_event(f"answered {response.status_code}")
    if response.status_code == 422:
        details = response.json()["error"]["details"]
        assert details
        assert all(d["loc"] and "index" in d for d in details)
        assert await stored_ids(telemetry, events) == 0  # nothing of the request
        return
    db = telemetry.runtime.db
    for sent in events:
        doc = await db[EVENTS].find_one({"_id": sent["properties"]["id"]})
        assert doc is not None
        assert doc["raw"] == sent  # read back unchanged ($ names, big numbers, unicode, ...)
        assert json.loads(json.dumps(doc["raw"])) == sent  # no BSON-only type came back
        parsed = CliEvent.model_validate(doc["raw"])
        moment = seen_at(parsed, doc["receivedAt"])
        assert doc["receivedAt"] - TRUSTED_PAST <= moment <= doc["receivedAt"] + TRUSTED_FUTURE
        delta = BucketDelta()
        delta.add(parsed, moment)
        assert 0 <= delta.durationMsTotal <= MAX_DURATION_MS
        # The bucket update itself is applied, twice (a device with history), by the database.
        probe = db["bounds_probe"]
        await probe.update_one(
            {"_id": sent["distinct_id"]}, delta.update_operators("anon"), upsert=True
        )
        await probe.update_one(
            {"_id": sent["distinct_id"]}, delta.update_operators("anon"), upsert=True
        )
        bucket = (await probe.find_one({"_id": sent["distinct_id"]}))["anon"]
        assert bucket["invocations"] == 2
        assert bucket.get("durationMsTotal", 0) == 2 * delta.durationMsTotal
