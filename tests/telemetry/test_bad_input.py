"""Bad input: the right status, a JSON body naming the problem, and nothing stored."""

from __future__ import annotations

import json
from typing import Any

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry_service.collections import EVENTS
from telemetry_service.ingest.storable import DBREF_FIELDS, MAX_DEPTH, unstorable
from tests.telemetry.conftest import Telemetry, cli_event


async def nothing_stored(telemetry: Telemetry) -> bool:
    return await telemetry.runtime.db[EVENTS].count_documents({}) == 0


async def post_raw(telemetry: Telemetry, body: bytes, **headers: str) -> Any:
    return await telemetry.http.post(
        "/ingest", content=body, headers={"content-type": "application/json", **headers}
    )


async def test_invalid_json_is_400(telemetry: Telemetry) -> None:
    response = await post_raw(telemetry, b'{"event": ')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert await nothing_stored(telemetry)


async def test_nan_and_infinity_are_not_json(telemetry: Telemetry) -> None:
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        response = await post_raw(telemetry, b'{"event": ' + token + b"}")
        assert response.status_code == 400
    assert await nothing_stored(telemetry)


async def test_schema_errors_are_422_with_the_index_of_each_bad_event(telemetry: Telemetry) -> None:
    good = cli_event("d")
    no_status = cli_event("d")
    del no_status["properties"]["result"]["status"]
    no_id = cli_event("d", insert_id=False)
    del no_id["properties"]["id"]
    response = await telemetry.post({"events": [good, no_status, no_id, "text"]})
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert {d["index"] for d in details} == {1, 2, 3}
    assert "events[1].properties.result.status" in {d["loc"] for d in details}
    assert any("event id is required" in d["msg"] for d in details if d["index"] == 2)
    assert await nothing_stored(telemetry)  # the good one is not stored either


async def test_wrong_shapes_are_422(telemetry: Telemetry) -> None:
    for body in ([cli_event("d")], {"events": "nope"}, 42, "text"):
        response = await telemetry.post(body)
        assert response.status_code == 422, body
    assert await nothing_stored(telemetry)


async def test_a_body_over_1_mib_is_413_before_parsing(telemetry: Telemetry) -> None:
    huge = b'{"events": [' + b" " * (1024 * 1024) + b"]}"
    response = await post_raw(telemetry, huge)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    # A lying (absent) Content-Length is caught while streaming.
    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * 100_000

    streamed = await telemetry.http.post("/ingest", content=chunks())
    assert streamed.status_code == 413
    assert await nothing_stored(telemetry)


async def test_more_than_1000_events_is_413(telemetry: Telemetry) -> None:
    tiny = {"event": "x", "distinct_id": "d", "insert_id": "i", "properties": {}}
    response = await post_raw(telemetry, json.dumps({"events": [tiny] * 1001}).encode())
    assert response.status_code == 413
    assert await nothing_stored(telemetry)


def with_extra(placeholder_json: str) -> bytes:
    """A valid CLI event whose properties.extra is the given raw JSON text."""
    event = cli_event("d")
    event["properties"]["extra"] = "PLACEHOLDER"
    return json.dumps(event).replace('"PLACEHOLDER"', placeholder_json).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("extra", "loc", "reason"),
    [
        ('{"a\\u0000b": 1}', "properties.extra.a\x00b", "NUL character"),
        ('"\\ud800"', "properties.extra", "surrogate"),
        ('{"\\udfff": 1}', "properties.extra.\\udfff", "surrogate"),
        (str(2**64), "properties.extra", "64-bit"),
        (nested(MAX_DEPTH + 5), "properties.extra", f"deeper than {MAX_DEPTH}"),
    ],
)
async def test_json_that_bson_cannot_hold_is_422_naming_the_field(
    telemetry: Telemetry, extra: str, loc: str, reason: str
) -> None:
    # Found by fuzzing: each of these was a 500 from the driver (and, nested past 100 levels,
    # mongod refuses the document while the embedded server stores it).
    bad = with_extra(extra)
    batch = b'{"events": [' + json.dumps(cli_event("d")).encode() + b", " + bad + b"]}"
    response = await post_raw(telemetry, batch)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["index"] == 1
    assert detail["loc"].startswith(f"events[1].{loc}")
    assert reason in detail["msg"]
    assert await nothing_stored(telemetry)  # the good event of the batch neither


async def test_json_nested_beyond_the_parser_is_400(telemetry: Telemetry) -> None:
    response = await post_raw(telemetry, b'{"events": ' + nested(200_000).encode() + b"}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert await nothing_stored(telemetry)


async def test_odd_but_storable_properties_are_kept_as_sent(telemetry: Telemetry) -> None:
    extra = {"$where": 1, "a.b": 2, "ünï 🐸": "ç" * 10, "big": "x" * 500_000, "n": 2**63 - 1}
    event = cli_event("d")
    event["properties"]["extra"] = {**extra, "deep": json.loads(nested(MAX_DEPTH - 5))}
    response = await telemetry.post(event)
    assert response.status_code == 202, response.text
    stored = await telemetry.runtime.db[EVENTS].find_one()
    assert stored is not None
    assert stored["raw"] == event
    await telemetry.drain()
    device = await telemetry.device("d")
    assert device.json()["anonymous"]["invocations"] == 1


async def test_a_10000_event_batch_is_413_and_a_unicode_username_422(telemetry: Telemetry) -> None:
    tiny = {"event": "x", "distinct_id": "d", "insert_id": "i", "properties": {}}
    response = await post_raw(telemetry, json.dumps({"events": [tiny] * 10_000}).encode())
    assert response.status_code == 413
    assert await nothing_stored(telemetry)
    for name in ("ünïcödé", "🐸🐸🐸", "alice\u0000"):
        stats = await telemetry.http.get("/v1/stats", params={"username": name})
        assert stats.status_code == 422, name


surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1)
any_text = (
    st.text(max_size=8) | surrogates | st.just("a\x00b") | st.sampled_from(sorted(DBREF_FIELDS))
)
bson_hostile = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | any_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=bson_hostile)
def test_unstorable_says_exactly_what_bson_refuses(value: Any) -> None:
    """Refused: what BSON cannot encode, and DBRef field names (the one shape that encodes but
    does not read back as sent). All else reads back unchanged."""
    try:
        encoded = bson.encode({"raw": value})
        encodes = True
    except (bson.errors.InvalidDocument, UnicodeEncodeError, OverflowError):
        encodes = False
    assert (unstorable(value) is None) == (encodes and not has_dbref_field(value))
    if unstorable(value) is None:
        assert bson.decode(encoded) == {"raw": value}


def has_dbref_field(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(DBREF_FIELDS & value.keys()) or any(map(has_dbref_field, value.values()))
    return isinstance(value, list) and any(map(has_dbref_field, value))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {"event": json_values, "distinct_id": json_values, "properties": json_values},
    optional={"insert_id": json_values},
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(
        json_values, event_like, st.fixed_dictionaries({"events": st.lists(event_like, max_size=3)})
    ),
    key=st.none() | st.text(max_size=30),
    authorization=st.none()
    | st.text(max_size=30)
    | st.sampled_from(["Bearer", "Bearer ", "Basic abc", "bearer x y", "Bearer swamp_x"]),
)
async def test_random_json_never_gets_a_500(
    telemetry: Telemetry, body: Any, key: str | None, authorization: str | None
) -> None:
    def header(value: str | None) -> bool:  # what an HTTP client can send at all
        return bool(value) and value.isascii() and value.isprintable()  # type: ignore[union-attr]

    headers = {"x-api-key": key} if header(key) else {}
    if header(authorization):
        headers["authorization"] = authorization  # type: ignore[assignment]
    response = await telemetry.http.post("/ingest", json=body, headers=headers)
    assert response.status_code in {202, 400, 401, 413, 422}, response.text
    if response.status_code != 202:
        assert "error" in response.json()


@pytest.mark.parametrize(
    ("field", "value"),
    [("exitCode", False), ("durationMs", "447"), ("durationMs", True)],
)
async def test_numbers_and_booleans_are_not_coerced(
    telemetry: Telemetry, field: str, value: Any
) -> None:
    """What the schema calls an integer or a boolean must be one: lax coercion (false as 0,
    "447" as 447) would accept requests the published OpenAPI schema refuses."""
    event = cli_event("coerce-dev")
    if field == "exitCode":
        event["properties"]["result"]["exitCode"] = value
    else:
        event["properties"][field] = value
    response = await telemetry.post(event)
    assert response.status_code == 422
    assert field in response.json()["error"]["details"][0]["loc"]
