"""Deleting an account: keys dead here and (through api_key_revoked) at telemetry, score gone,
username reserved — in one transaction, and no key can slip past a concurrent deletion."""

from __future__ import annotations

import asyncio

from shared_contracts.keys import api_key_hash
from swamp_app.api_keys.service import issue_key_for
from swamp_app.collections import API_KEYS, USER_SCORES, USERS
from swamp_app.errors import NotFound
from swamp_app.users.service import delete_user
from tests.app.conftest import App
from tests.app.test_scores import refresh, snapshot


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_deleting_yourself_revokes_every_key_and_tells_telemetry(app: App) -> None:
    user = await app.register("alice")
    second = (await app.http.post("/v1/users/me/api-keys", headers=bearer(user["apiKey"]))).json()
    await app.register("bob")  # an innocent bystander keeps everything

    response = await app.http.delete("/v1/users/me", headers=bearer(user["apiKey"]))

    assert response.status_code == 204
    for key in (user["apiKey"], second["apiKey"]):
        assert (await app.http.get("/api/whoami", headers=bearer(key))).status_code == 401
    revoked = {c["keyHash"] for c in await app.commands("api_key_revoked")}
    assert revoked == {api_key_hash(user["apiKey"]), api_key_hash(second["apiKey"])}
    assert (await app.http.get("/v1/users/alice")).status_code == 404
    assert (await app.http.get("/v1/users/alice/score")).status_code == 404
    board = (await app.http.get("/v1/leaderboard")).json()["entries"]
    assert [e["username"] for e in board] == ["bob"]
    assert await app.runtime.db[API_KEYS].count_documents({"revokedAt": None}) == 1  # bob's


async def test_a_deleted_username_stays_reserved(app: App) -> None:
    user = await app.register("alice")
    await app.http.delete("/v1/users/me", headers=bearer(user["apiKey"]))
    # Telemetry's history under "alice" must never be credited to a stranger.
    response = await app.http.post("/v1/users", json={"username": "alice"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "username_taken"


async def test_deletion_is_idempotent_and_refreshes_for_the_name_are_acknowledged(app: App) -> None:
    user = await app.register("alice")
    assert await delete_user(app.runtime, user_id=user["id"]) is True
    assert await delete_user(app.runtime, user_id=user["id"]) is False
    assert len(await app.commands("api_key_revoked")) == 1  # revoked once, not twice

    await refresh(app, "alice", 1, snapshot(3, 3))

    assert await app.runtime.db[USER_SCORES].count_documents({}) == 0  # not resurrected
    (message,) = await app.runtime.refreshes.collection.find().to_list()
    assert message["status"] == "done"
    tombstone = await app.runtime.db[USERS].find_one({"_id": user["id"]})
    assert tombstone is not None
    assert tombstone["deletedAt"] is not None


async def test_a_key_issued_concurrently_with_the_deletion_never_outlives_it(app: App) -> None:
    # The issue and the deletion both write the user document, so one transaction conflicts
    # and retries after the other: either the deletion sees the new key and revokes it, or the
    # issue sees the tombstone and fails. Never a live key of a deleted user.
    for round_ in range(5):
        user = await app.register(f"racer-{round_}")
        issued, deleted = await asyncio.gather(
            issue_key_for(app.runtime, user_id=user["id"]),
            delete_user(app.runtime, user_id=user["id"]),
            return_exceptions=True,
        )
        assert deleted is True
        assert isinstance(issued, tuple | NotFound), issued
        live = {"userId": user["id"], "revokedAt": None}
        assert await app.runtime.db[API_KEYS].count_documents(live) == 0
        hashes = {k["keyHash"] async for k in app.runtime.db[API_KEYS].find({"userId": user["id"]})}
        revoked = {
            c["keyHash"] for c in await app.commands("api_key_revoked") if c["keyHash"] in hashes
        }
        assert revoked == hashes  # telemetry hears of every key it was told about


async def test_a_deleted_user_cannot_rename_or_issue_keys(app: App) -> None:
    user = await app.register("alice")
    await app.http.delete("/v1/users/me", headers=bearer(user["apiKey"]))
    assert (await app.rename(user["apiKey"], "alice2")).status_code == 401
    created = await app.http.post("/v1/users/me/api-keys", headers=bearer(user["apiKey"]))
    assert created.status_code == 401
