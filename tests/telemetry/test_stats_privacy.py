"""Device ids attribute anonymous history (I3), so they are not public (SPEC I12): the public
projection has none; the user's own key or the admin token shows them; a device's buckets need
its owner's key (which sees the anonymous bucket and its own) or the admin token (every
bucket)."""

from __future__ import annotations

from tests.telemetry.conftest import ADMIN, Telemetry, cli_event


async def test_the_public_projection_lists_no_device_ids(telemetry: Telemetry) -> None:
    owner, key = await telemetry.register("owner")
    _, other_key = await telemetry.register("other")
    await telemetry.post(cli_event("laptop"), key)
    await telemetry.drain()
    public = await telemetry.http.get("/v1/stats", params={"username": "owner"})
    assert public.status_code == 200
    assert "distinctIds" not in public.json()
    stranger = await telemetry.http.get(
        "/v1/stats", params={"username": "owner"}, headers={"x-api-key": other_key}
    )
    assert "distinctIds" not in stranger.json()
    own = await telemetry.http.get(
        "/v1/stats", params={"username": "owner"}, headers={"x-api-key": key}
    )
    assert own.json()["distinctIds"] == ["laptop"]
    operator = await telemetry.http.get("/v1/stats", params={"username": "owner"}, headers=ADMIN)
    assert (operator.json()["userId"], operator.json()["distinctIds"]) == (owner, ["laptop"])


async def test_device_stats_need_the_owners_key_or_the_admin_token(telemetry: Telemetry) -> None:
    owner, key = await telemetry.register("owner")
    guest, guest_key = await telemetry.register("guest")
    await telemetry.post(cli_event("shared"), key)  # owner first
    await telemetry.post(cli_event("shared"), guest_key)
    await telemetry.post(cli_event("shared"))
    await telemetry.drain()

    anyone = await telemetry.http.get("/v1/stats", params={"distinct_id": "shared"})
    assert anyone.status_code == 401
    assert anyone.json()["error"]["code"] == "unauthorized"
    # A user who is not the owner learns nothing, not even that the device exists.
    for device in ("shared", "no-such-device"):
        response = await telemetry.http.get(
            "/v1/stats", params={"distinct_id": device}, headers={"x-api-key": guest_key}
        )
        assert response.status_code == 404
    mine = await telemetry.http.get(
        "/v1/stats", params={"distinct_id": "shared"}, headers={"x-api-key": key}
    )
    assert mine.status_code == 200
    assert mine.json()["anonymous"]["invocations"] == 1
    assert set(mine.json()["users"]) == {owner}  # not the guest's bucket
    everything = (await telemetry.device("shared")).json()
    assert set(everything["users"]) == {owner, guest}


async def test_a_refresh_snapshot_carries_no_device_ids_or_day_list(telemetry: Telemetry) -> None:
    owner, key = await telemetry.register("owner")
    await telemetry.post(cli_event("laptop"), key)
    await telemetry.drain()
    refresh = (await telemetry.refreshes(owner))[-1]
    assert refresh["snapshot"]["activeDays"] == 1
    assert "distinctIds" not in refresh["snapshot"]
    assert "activeDayList" not in refresh["snapshot"]
