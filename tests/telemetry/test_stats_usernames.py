"""GET /v1/stats?username= matches the username whole, like the app and the message schemas."""

from __future__ import annotations

import pytest

from telemetry_service.collections import USERNAME_METRICS
from tests.support import assert_planned_on_an_index
from tests.telemetry.conftest import Telemetry


@pytest.mark.parametrize("name", ["zed\n", "zed\r\n", "\nzed", "zed\n\n", "ze\nd"])
async def test_a_username_with_a_newline_is_422(telemetry: Telemetry, name: str) -> None:
    response = await telemetry.http.get("/v1/stats", params={"username": name})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == "query.username"


async def test_a_well_formed_unknown_username_is_404(telemetry: Telemetry) -> None:
    response = await telemetry.http.get("/v1/stats", params={"username": "zed"})
    assert response.status_code == 404


async def test_the_stats_look_up_is_planned_on_an_index(telemetry: Telemetry) -> None:
    """On the embedded server, which never plans a query on a partial index, it read every
    projection: 112 ms a request with 5,000 users, growing with them."""
    await assert_planned_on_an_index(telemetry.runtime.db, USERNAME_METRICS, {"username": "zed"})
