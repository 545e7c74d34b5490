"""Bad input: the right status, a JSON body naming the problem, and nothing stored."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry_service.collections import EVENTS
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
)
async def test_random_json_never_gets_a_500(
    telemetry: Telemetry, body: Any, key: str | None
) -> None:
    headers = {"x-api-key": key} if key and key.isascii() and key.isprintable() else {}
    response = await telemetry.http.post("/ingest", json=body, headers=headers)
    assert response.status_code in {202, 400, 401, 413, 422}, response.text
    if response.status_code != 202:
        assert "error" in response.json()
