"""Registration, API keys, whoami and renames (#211, I5)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from shared_contracts import failpoints, mongo
from shared_contracts.keys import api_key_hash
from swamp_app.collections import API_KEYS, USER_SCORES, USERS
from swamp_app.users.service import AFTER_USER_UPDATE, rename_user
from tests.app.conftest import App


@pytest.fixture(autouse=True)
def no_failpoints() -> Iterator[None]:
    yield
    failpoints.disarm()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_registration_returns_a_key_stores_only_its_hash_and_tells_telemetry(
    app: App,
) -> None:
    user = await app.register("alice")
    assert set(user) == {"id", "username", "apiKey"}
    assert user["apiKey"].startswith("swamp_")
    keys = await app.runtime.db[API_KEYS].find().to_list()
    assert [k["keyHash"] for k in keys] == [api_key_hash(user["apiKey"])]
    for collection in (USERS, API_KEYS, USER_SCORES):
        async for document in app.runtime.db[collection].find():
            assert user["apiKey"] not in str(document)
    commands = await app.commands()
    assert [c["type"] for c in commands] == ["user_registered", "api_key_issued"]
    assert commands[0]["userId"] == user["id"]
    assert commands[0]["username"] == "alice"
    assert commands[1]["keyHash"] == api_key_hash(user["apiKey"])
    score = await app.score("alice")
    assert (score["canonicalScore"], score["sourceVersion"]) == (0.0, 0)


@pytest.mark.parametrize(
    ("username", "rule"),
    [
        ("ab", "3 to 39 characters"),
        ("a" * 40, "3 to 39 characters"),
        ("Alice", "only lowercase letters, digits and hyphens"),
        ("al_ice", "only lowercase letters, digits and hyphens"),
        ("-alice", "does not start or end with a hyphen"),
        ("alice-", "does not start or end with a hyphen"),
        ("al--ice", "no consecutive hyphens"),
    ],
)
async def test_each_username_rule_is_named_in_the_422(app: App, username: str, rule: str) -> None:
    response = await app.http.post("/v1/users", json={"username": username})
    assert response.status_code == 422
    (detail,) = response.json()["error"]["details"]
    assert detail["loc"] == "body.username"
    assert rule in detail["msg"]
    assert await app.runtime.db[USERS].count_documents({}) == 0


async def test_a_taken_username_is_409(app: App) -> None:
    await app.register("bob")
    response = await app.http.post("/v1/users", json={"username": "bob"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "username_taken"
    assert await app.runtime.db[USERS].count_documents({}) == 1
    assert len(await app.commands("user_registered")) == 1


async def test_whoami_answers_the_cli(app: App) -> None:
    user = await app.register("carol")
    response = await app.http.get("/api/whoami", headers={"x-api-key": user["apiKey"]})
    assert response.json() == {"authenticated": True, "id": user["id"], "username": "carol"}
    assert (
        await app.http.get("/api/whoami", headers={"x-api-key": "swamp_nope"})
    ).status_code == 401
    assert (await app.http.get("/api/whoami")).status_code == 401


async def test_keys_are_issued_and_revoked_with_their_commands(app: App) -> None:
    user = await app.register("dave")
    created = await app.http.post("/v1/users/me/api-keys", headers=bearer(user["apiKey"]))
    assert created.status_code == 201
    second = created.json()
    assert (await app.http.get("/api/whoami", headers=bearer(second["apiKey"]))).status_code == 200
    deleted = await app.http.delete(
        f"/v1/users/me/api-keys/{second['id']}", headers=bearer(user["apiKey"])
    )
    assert deleted.status_code == 204
    assert (await app.http.get("/api/whoami", headers=bearer(second["apiKey"]))).status_code == 401
    revoked = await app.commands("api_key_revoked")
    assert [c["keyHash"] for c in revoked] == [api_key_hash(second["apiKey"])]
    issued = await app.commands("api_key_issued")
    assert api_key_hash(second["apiKey"]) in {c["keyHash"] for c in issued}


async def test_revoking_someone_else_s_key_is_404(app: App) -> None:
    erin, frank = await app.register("erin"), await app.register("frank")
    frank_keys = await app.runtime.db[API_KEYS].find({"userId": frank["id"]}).to_list()
    response = await app.http.delete(
        f"/v1/users/me/api-keys/{frank_keys[0]['_id']}", headers=bearer(erin["apiKey"])
    )
    assert response.status_code == 404
    assert (await app.http.get("/api/whoami", headers=bearer(frank["apiKey"]))).status_code == 200


async def test_rename_changes_user_score_and_command_in_one_commit(app: App) -> None:
    user = await app.register("gina")
    response = await app.rename(user["apiKey"], "gina-b")
    assert response.status_code == 200
    assert response.json() == {"id": user["id"], "username": "gina-b"}
    assert (await app.runtime.db[USERS].find_one({"_id": user["id"]}))["username"] == "gina-b"
    assert (await app.score("gina-b"))["username"] == "gina-b"
    assert (await app.http.get("/v1/users/gina/score")).status_code == 404
    (changed,) = await app.commands("username_changed")
    assert {k: changed[k] for k in ("oldUsername", "newUsername", "userId", "seq")} == {
        "oldUsername": "gina",
        "newUsername": "gina-b",
        "userId": user["id"],
        "seq": 2,  # the name clock: 1 was gina's registration
    }
    await app.rename(user["apiKey"], "gina-c")
    assert [c["seq"] for c in await app.commands("username_changed")] == [2, 3]


async def test_a_crash_after_the_user_update_leaves_all_three_untouched(app: App) -> None:
    user = await app.register("hank")
    failpoints.arm(AFTER_USER_UPDATE, times=1)
    with pytest.raises(failpoints.FailpointError):
        await rename_user(app.runtime, user_id=user["id"], new_username="hank-b")
    assert (await app.runtime.db[USERS].find_one({"_id": user["id"]}))["username"] == "hank"
    assert (await app.score("hank"))["username"] == "hank"
    assert await app.commands("username_changed") == []


async def test_rename_to_one_s_own_name_is_a_no_op_and_to_a_taken_one_409(app: App) -> None:
    ivan = await app.register("ivan")
    await app.register("judy")
    same = await app.rename(ivan["apiKey"], "ivan")
    assert (same.status_code, same.json()["username"]) == (200, "ivan")
    taken = await app.rename(ivan["apiKey"], "judy")
    assert taken.status_code == 409
    assert await app.commands("username_changed") == []
    assert (await app.rename("swamp_wrong", "kate")).status_code == 401
    invalid = await app.rename(ivan["apiKey"], "Not-OK")
    assert invalid.status_code == 422


async def test_two_users_racing_for_one_name_exactly_one_wins(app: App) -> None:
    a, b = await app.register("liam"), await app.register("mona")
    responses = await asyncio.gather(
        app.rename(a["apiKey"], "prize"), app.rename(b["apiKey"], "prize")
    )
    assert sorted(r.status_code for r in responses) == [200, 409]
    assert await app.runtime.db[USERS].count_documents({"username": "prize"}) == 1
    assert len(await app.commands("username_changed")) == 1


async def test_no_api_key_ever_reaches_the_logs(app: App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    user = await app.register("nina")
    await app.http.get("/api/whoami", headers={"x-api-key": user["apiKey"]})
    await app.http.post("/v1/users/me/api-keys", headers=bearer(user["apiKey"]))
    await app.rename(user["apiKey"], "nina-b")
    logged = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    assert user["apiKey"] not in logged


async def test_a_wrong_method_names_every_method_of_the_path(app: App) -> None:
    # Three routes share /v1/users/me; Starlette's own 405 would name only the first.
    response = await app.http.put("/v1/users/me")
    assert response.status_code == 405
    assert response.headers["Allow"] == "DELETE, GET, PATCH"
    assert response.json()["error"]["code"] == "http_405"


async def test_get_me_is_the_signed_in_user_not_a_username(app: App) -> None:
    user = await app.register("alice")
    me = await app.http.get("/v1/users/me", headers=bearer(user["apiKey"]))
    assert me.json() == {"id": user["id"], "username": "alice"}
    assert (await app.http.get("/v1/users/me")).status_code == 401


async def test_every_name_assignment_takes_the_next_value_of_one_clock(app: App) -> None:
    """Registrations and renames of all users share the name clock, so telemetry can order
    two users' claims on one name as the app committed them (I6)."""
    ivy = await app.register("ivy")
    jon = await app.register("jon")
    await app.rename(ivy["apiKey"], "ivy-b")
    await app.rename(jon["apiKey"], "ivy")  # the freed name, taken at once
    registered = [c["seq"] for c in await app.commands("user_registered")]
    renamed = [c["seq"] for c in await app.commands("username_changed")]
    assert (registered, renamed) == ([1, 2], [3, 4])


async def test_the_clock_starts_above_old_counters_and_re_asserts_every_name_once(
    app: App,
) -> None:
    """The upgrade from per-user renameSeq: the clock starts above the highest, and every user's
    current name is published on it once, so telemetry converges whatever order the old
    release's commands arrive in."""
    from swamp_app.collections import COUNTERS
    from swamp_app.users.name_clock import NAME_CLOCK, ensure_name_clock

    db = app.runtime.db
    await mongo.delete_many(db[COUNTERS], {})  # as before the clock existed
    await db[USERS].insert_many(
        [
            {"_id": "old-1", "username": "kay", "renameSeq": 4},
            {"_id": "old-2", "username": "lou", "renameSeq": 9, "deletedAt": datetime.now(UTC)},
        ]
    )
    assert await ensure_name_clock(app.runtime, batch_size=1) == 2
    reasserted = {(c["userId"], c["newUsername"], c["seq"]) for c in await app.commands()}
    assert reasserted == {("old-1", "kay", 10), ("old-2", "lou", 11)}  # a tombstone's name too
    assert (await db[COUNTERS].find_one({"_id": NAME_CLOCK}))["value"] == 11
    assert await ensure_name_clock(app.runtime) == 0  # once per deployment
    user = await app.register("mae")
    (registered,) = await app.commands("user_registered")
    assert (registered["userId"], registered["seq"]) == (user["id"], 12)
