"""username_changed on the telemetry side (I6, I10)."""

from __future__ import annotations

from shared_contracts.messages import UsernameChanged
from telemetry_service.collections import IDENTITY_MAP, KNOWN_USERS
from tests.telemetry.conftest import Telemetry, cli_event


async def rename(telemetry: Telemetry, user_id: str, old: str, new: str, seq: int) -> None:
    await telemetry.runtime.commands.publish(
        UsernameChanged(oldUsername=old, newUsername=new, userId=user_id, seq=seq)
    )
    await telemetry.drain()


async def entry(telemetry: Telemetry, username: str) -> dict[str, object] | None:
    return await telemetry.runtime.db[IDENTITY_MAP].find_one({"_id": username})


async def test_an_existing_mapping_is_re_keyed(telemetry: Telemetry) -> None:
    user_id, key = await telemetry.register("alice")
    await telemetry.post({"events": [cli_event("a1"), cli_event("a2")]}, key)
    await telemetry.drain()
    before = await telemetry.stats("alice")
    await rename(telemetry, user_id, "alice", "alicia", 1)
    assert await entry(telemetry, "alice") is None
    assert (await entry(telemetry, "alicia"))["distinctIds"] == ["a1", "a2"]
    after = await telemetry.stats("alicia")
    assert after["totalInvocations"] == before["totalInvocations"] == 2
    assert after["projectionVersion"] > before["projectionVersion"]  # monotonic per user
    assert (await telemetry.http.get("/v1/stats", params={"username": "alice"})).status_code == 404
    refresh = (await telemetry.refreshes("alicia"))[-1]
    assert refresh["reason"] == "identity_migration"


async def test_mappings_under_both_names_are_merged(telemetry: Telemetry) -> None:
    user_id, key = await telemetry.register("bob")
    await telemetry.post(cli_event("b1"), key)
    await telemetry.drain()
    # A stale entry under the new name (left by an older system) with another device.
    await telemetry.runtime.db[IDENTITY_MAP].insert_one(
        {"_id": "bobby", "userId": user_id, "distinctIds": ["b2"]}
    )
    await rename(telemetry, user_id, "bob", "bobby", 1)
    assert (await entry(telemetry, "bobby"))["distinctIds"] == ["b1", "b2"]
    assert await entry(telemetry, "bob") is None


async def test_no_mapping_is_a_no_op_that_still_moves_the_user(telemetry: Telemetry) -> None:
    await rename(telemetry, "u-unknown", "carol", "caroline", 1)
    assert await entry(telemetry, "caroline") is None
    known = await telemetry.runtime.db[KNOWN_USERS].find_one({"_id": "u-unknown"})
    assert (known["username"], known["renameSeq"]) == ("caroline", 1)
    (command,) = await telemetry.runtime.commands.collection.find().to_list()
    assert command["status"] == "done"


async def test_redelivery_and_a_stale_seq_change_nothing(telemetry: Telemetry) -> None:
    user_id, key = await telemetry.register("dave")
    await telemetry.post(cli_event("d1"), key)
    await telemetry.drain()
    await rename(telemetry, user_id, "dave", "david", 1)
    version = (await telemetry.stats("david"))["projectionVersion"]
    await rename(telemetry, user_id, "dave", "david", 1)  # redelivered
    await rename(telemetry, user_id, "david", "dave", 1)  # stale seq, even if it looks new
    assert (await telemetry.stats("david"))["projectionVersion"] == version
    assert await entry(telemetry, "dave") is None


async def test_two_renames_back_to_back_apply_in_order(telemetry: Telemetry) -> None:
    user_id, key = await telemetry.register("erin")
    await telemetry.post(cli_event("e1"), key)
    await telemetry.drain()
    for seq, (old, new) in enumerate([("erin", "erin-b"), ("erin-b", "erin-c")], start=1):
        await telemetry.runtime.commands.publish(
            UsernameChanged(oldUsername=old, newUsername=new, userId=user_id, seq=seq)
        )
    await telemetry.drain()
    assert [e["_id"] async for e in telemetry.runtime.db[IDENTITY_MAP].find()] == ["erin-c"]
    assert (await telemetry.stats("erin-c"))["totalInvocations"] == 1


async def test_an_event_sent_before_a_rename_and_processed_after_lands_under_the_new_name(
    telemetry: Telemetry,
) -> None:
    user_id, key = await telemetry.register("frank")
    await telemetry.post(cli_event("f1"), key)  # accepted, not yet processed
    await rename(telemetry, user_id, "frank", "francis", 1)  # drain: rename, then the event
    assert (await telemetry.stats("francis"))["totalInvocations"] == 1
    assert await entry(telemetry, "frank") is None
    await telemetry.post(cli_event("f1b"), key)  # the same key keeps working after the rename
    await telemetry.drain()
    assert (await telemetry.stats("francis"))["totalInvocations"] == 2
    assert await entry(telemetry, "frank") is None
