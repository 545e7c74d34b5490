"""Names on the telemetry side (I6, I10): a rename is a state assignment on the user's entry;
data never moves between userIds."""

from __future__ import annotations

from typing import Any

from telemetry_service.collections import IDENTITY_MAP, KNOWN_USERS, USERNAME_METRICS
from telemetry_service.projection.verify import find_drift
from tests.telemetry.conftest import Telemetry, cli_event


async def entry(telemetry: Telemetry, user_id: str) -> dict[str, Any] | None:
    return await telemetry.runtime.db[IDENTITY_MAP].find_one({"_id": user_id})


async def test_a_rename_moves_the_name_and_keeps_the_data(telemetry: Telemetry) -> None:
    """Seed case 'only the old entry': the user's entry now answers to the new name."""
    user_id, key = await telemetry.register("alice")
    await telemetry.post({"events": [cli_event("a1"), cli_event("a2")]}, key)
    await telemetry.drain()
    before = await telemetry.stats("alice")
    await telemetry.rename(user_id, "alice", "alicia")
    renamed = await entry(telemetry, user_id)
    assert renamed is not None
    assert (renamed["username"], renamed["distinctIds"]) == ("alicia", ["a1", "a2"])
    after = await telemetry.stats("alicia")
    assert after["totalInvocations"] == before["totalInvocations"] == 2
    assert after["projectionVersion"] == before["projectionVersion"] + 1  # per user, no reset
    assert await telemetry.stats_status("alice") == 404
    refresh = (await telemetry.refreshes(user_id))[-1]
    assert (refresh["reason"], refresh["username"]) == ("identity_migration", "alicia")
    assert await find_drift(telemetry.runtime.db) == []


async def test_a_rename_for_a_user_telemetry_never_saw_records_its_name(
    telemetry: Telemetry,
) -> None:
    """Seed case 'neither entry': nothing to move; the name is known for later events."""
    await telemetry.rename("u-unknown", "carol", "caroline", seq=7)
    known = await telemetry.runtime.db[KNOWN_USERS].find_one({"_id": "u-unknown"})
    assert (known["username"], known["nameSeq"]) == ("caroline", 7)
    assert (await telemetry.stats("caroline"))["totalInvocations"] == 0
    (command,) = await telemetry.runtime.commands.collection.find().to_list()
    assert command["status"] == "done"


async def test_a_name_held_by_another_users_leftover_moves_nothing_of_theirs(
    telemetry: Telemetry,
) -> None:
    """The new name is still held here by another userId (its rename away is on its way): the
    label moves, each user's data stays with its userId."""
    bob, bob_key = await telemetry.register("bob")
    alice, alice_key = await telemetry.register("alice")
    await telemetry.post({"events": [cli_event("bob-dev") for _ in range(3)]}, bob_key)
    await telemetry.post(cli_event("alice-dev"), alice_key)
    await telemetry.drain()
    bob_renamed = telemetry.renamed(bob, "bob", "carol")  # committed first in the app...
    await telemetry.rename(alice, "alice", "bob")  # ...but applied after alice took "bob"
    stats = await telemetry.stats("bob")
    assert (stats["userId"], stats["totalInvocations"]) == (alice, 1)
    bob_entry = await entry(telemetry, bob)
    assert bob_entry is not None
    assert "username" not in bob_entry  # nameless until its own command arrives
    assert bob_entry["distinctIds"] == ["bob-dev"]
    await telemetry.runtime.commands.publish(bob_renamed)
    await telemetry.drain()
    assert (await telemetry.stats("carol"))["totalInvocations"] == 3
    assert (await telemetry.stats("bob"))["totalInvocations"] == 1
    assert await find_drift(telemetry.runtime.db) == []


async def test_an_older_claim_never_takes_a_name_from_a_newer_one(telemetry: Telemetry) -> None:
    """alice took "bob" at seq 5; a delayed command of bob's, "bob as of seq 3", is older: bob
    has renamed since (that command is on its way), so bob stays nameless, alice keeps it."""
    bob, _ = await telemetry.register("bob-old", user_id="u-bob")  # seq 1
    alice, _ = await telemetry.register("alice", user_id="u-alice")  # seq 2
    await telemetry.rename(alice, "alice", "bob", seq=5)
    await telemetry.rename(bob, "bob-old", "bob", seq=3)
    assert (await telemetry.stats("bob"))["userId"] == alice
    assert "username" not in (await entry(telemetry, bob) or {})
    await telemetry.rename(bob, "bob", "bob-new", seq=4)
    assert (await telemetry.stats("bob-new"))["userId"] == bob
    assert await find_drift(telemetry.runtime.db) == []


async def test_redelivery_and_a_stale_seq_change_nothing(telemetry: Telemetry) -> None:
    user_id, key = await telemetry.register("dave")
    await telemetry.post(cli_event("d1"), key)
    await telemetry.drain()
    command = telemetry.renamed(user_id, "dave", "david")
    await telemetry.runtime.commands.publish(command)
    await telemetry.drain()
    version = (await telemetry.stats("david"))["projectionVersion"]
    await telemetry.runtime.commands.publish(command)  # redelivered
    await telemetry.rename(user_id, "david", "dave", seq=command.seq - 1)  # stale
    await telemetry.drain()
    assert (await telemetry.stats("david"))["projectionVersion"] == version
    assert await telemetry.stats_status("dave") == 404


async def test_two_renames_back_to_back_apply_in_order(telemetry: Telemetry) -> None:
    user_id, key = await telemetry.register("erin")
    await telemetry.post(cli_event("e1"), key)
    await telemetry.drain()
    for old, new in [("erin", "erin-b"), ("erin-b", "erin-c")]:
        await telemetry.runtime.commands.publish(telemetry.renamed(user_id, old, new))
    await telemetry.drain()
    names = [e.get("username") async for e in telemetry.runtime.db[IDENTITY_MAP].find()]
    assert names == ["erin-c"]
    assert (await telemetry.stats("erin-c"))["totalInvocations"] == 1


async def test_an_event_sent_before_a_rename_and_processed_after_lands_under_the_new_name(
    telemetry: Telemetry,
) -> None:
    user_id, key = await telemetry.register("frank")
    await telemetry.post(cli_event("f1"), key)  # accepted, not yet processed
    await telemetry.rename(user_id, "frank", "francis")  # drain: rename, then the event
    assert (await telemetry.stats("francis"))["totalInvocations"] == 1
    await telemetry.post(cli_event("f1b"), key)  # the same key keeps working after the rename
    await telemetry.drain()
    assert (await telemetry.stats("francis"))["totalInvocations"] == 2
    assert await telemetry.stats_status("frank") == 404
    # One projection, per user: the old name never got one of its own.
    assert await telemetry.runtime.db[USERNAME_METRICS].count_documents({}) == 1
