"""Usernames are matched whole at every entry point, and the app's bodies are bounded."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shared_contracts.messages import (
    USERNAME_PATTERN,
    Username,
    UsernameChanged,
    UserRegistered,
)
from swamp_app.collections import USERS
from swamp_app.usernames import check_username
from tests.app.conftest import App

MESSAGE_USERNAME = TypeAdapter(Username)


def app_accepts(value: str) -> bool:
    try:
        check_username(value)
    except ValueError:
        return False
    return True


def messages_accept(value: str) -> bool:
    try:
        MESSAGE_USERNAME.validate_python(value)
    except ValidationError:
        return False
    return True


candidates = st.one_of(
    st.from_regex(USERNAME_PATTERN),  # Python's re: may end with a newline
    st.text(alphabet="az09-\n\r\t _.Aé\x00", max_size=42),
    st.text(max_size=42),
)


@settings(max_examples=500)
@given(candidates)
@example("zed\n")
@example("zed\r\n")
@example("\nzed")
@example("zed")
def test_the_app_and_the_message_schemas_accept_exactly_the_same_names(value: str) -> None:
    assert app_accepts(value) == messages_accept(value)
    if app_accepts(value):
        # What the app accepts can travel in every message that carries a username.
        UserRegistered(userId="u1", username=value)
        UsernameChanged(oldUsername=value, newUsername=value, userId="u1", seq=1)


@pytest.mark.parametrize("name", ["zed\n", "zed\r\n", "\nzed", "zed\n\n"])
def test_a_trailing_or_leading_newline_is_no_username(name: str) -> None:
    assert not app_accepts(name)
    assert not messages_accept(name)


async def test_a_newline_username_is_a_422_at_every_app_entry_point(app: App) -> None:
    # Issue 15: POST /v1/users {"username": "zed\n"} answered 500.
    response = await app.http.post("/v1/users", json={"username": "zed\n"})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["loc"] == "body.username"
    assert await app.runtime.db[USERS].count_documents({}) == 0

    user = await app.register("zed")
    renamed = await app.rename(user["apiKey"], "zed\n")
    assert renamed.status_code == 422, renamed.text
    assert renamed.json()["error"]["details"][0]["loc"] == "body.username"
    for path in ("/v1/users/zed%0A", "/v1/users/zed%0A/score"):
        looked_up = await app.http.get(path)
        assert looked_up.status_code == 422, (path, looked_up.text)
    assert len(await app.commands()) == 2  # user_registered and api_key_issued only


async def test_a_body_over_the_limit_is_413_in_the_error_shape(app: App) -> None:
    limit = app.runtime.settings.max_body_bytes
    padded = {"username": "bob", "pad": "x" * limit}
    response = await app.http.post("/v1/users", json=padded)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert str(limit) in error["message"]
    assert "x-request-id" in response.headers
    assert await app.runtime.db[USERS].count_documents({}) == 0

    # Streamed without a Content-Length: counted as it arrives.
    async def chunks() -> Any:
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    streamed = await app.http.post(
        "/v1/users", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "payload_too_large"


async def test_a_body_within_the_limit_reaches_the_route_unchanged(app: App) -> None:
    limit = app.runtime.settings.max_body_bytes
    body = json.dumps({"username": "dana"}).encode()
    padded = body[:-1] + b" " * (limit - len(body)) + b"}"  # exactly at the limit
    assert len(padded) == limit

    async def chunks() -> Any:
        for start in range(0, len(padded), 700):
            yield padded[start : start + 700]

    response = await app.http.post(
        "/v1/users", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["username"] == "dana"
