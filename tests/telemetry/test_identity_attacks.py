"""Attacks on the one-time identity upgrade (telemetry_service/identity/upgrade.py): data
directories written by the username-keyed layout exactly as the old code left them, including
the messy states its bugs produced, and commands the old app published before the deploy
still waiting in telemetry_commands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from shared_contracts import mongo
from shared_contracts.keys import api_key_hash
from shared_contracts.messages import ApiKeyIssued, UsernameChanged, UserRegistered
from telemetry_service.collections import (
    IDENTITY_MAP,
    KNOWN_USERS,
    USER_METRICS,
    USERNAME_METRICS,
)
from telemetry_service.identity.upgrade import IdentityUpgrade, legacy_layout
from telemetry_service.projection.verify import verify
from tests.telemetry.conftest import ADMIN, Telemetry

SEEN = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def bucket(invocations: int) -> dict[str, Any]:
    return {
        "invocations": invocations,
        "successCount": invocations,
        "commandCounts": {"model": invocations},
        "activeDays": ["2026-11-30"],
        "firstSeenAt": SEEN,
        "lastSeenAt": SEEN,
    }


async def old_device(t: Telemetry, device: str, owner: str, invocations: int) -> None:
    """A device document (unchanged by the upgrade): the owner's own bucket."""
    await t.runtime.db[USER_METRICS].insert_one(
        {
            "_id": device,
            "ownerUserId": owner,
            "ownedSince": SEEN,
            "userIds": [owner],
            "users": {owner: bucket(invocations)},
        }
    )


async def old_entry(t: Telemetry, username: str, user_id: str, devices: list[str]) -> None:
    """identity_map as the old code wrote it: _id = username, userId a field."""
    await t.runtime.db[IDENTITY_MAP].insert_one(
        {"_id": username, "userId": user_id, "distinctIds": devices}
    )


async def old_projection(
    t: Telemetry, username: str, user_id: str, total: int, version: int
) -> None:
    """username_metrics as the old writer wrote it (_id = username, the fold carried userId)."""
    await t.runtime.db[USERNAME_METRICS].insert_one(
        {
            "_id": username,
            "userId": user_id,
            "totalInvocations": total,
            "successCount": total,
            "projectionVersion": version,
            "updatedAt": SEEN,
        }
    )


async def old_known_user(
    t: Telemetry, user_id: str, username: str, rename_seq: int | None = None
) -> None:
    """known_users as the old consumer wrote it: renameSeq only once the user had renamed."""
    doc: dict[str, Any] = {"_id": user_id, "username": username, "registeredAt": SEEN}
    if rename_seq is not None:
        doc["renameSeq"] = rename_seq
    await t.runtime.db[KNOWN_USERS].insert_one(doc)


async def stats_or_none(t: Telemetry, username: str) -> dict[str, Any] | None:
    response = await t.http.get("/v1/stats", params={"username": username}, headers=ADMIN)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def hold(t: Telemetry, **match: Any) -> None:
    await mongo.update_many(
        t.runtime.commands.collection,
        {"status": "pending", **match},
        {"$set": {"availableAt": datetime(9000, 1, 1, tzinfo=UTC), "held": True}},
    )


async def release(t: Telemetry) -> None:
    await mongo.update_many(
        t.runtime.commands.collection,
        {"held": True},
        {"$set": {"availableAt": datetime.now(UTC)}, "$unset": {"held": ""}},
    )


async def test_upgrade_unites_two_old_entries_of_one_user_and_versions_rise(
    telemetry: Telemetry,
) -> None:
    """Holds. The old bug 1 left one user's devices under two names (two old entries, two old
    projections). After the upgrade the user has one entry with every device, its current
    name, every count, and a version above both old ones."""
    t = telemetry
    await old_device(t, "a-laptop", "A", 3)
    await old_device(t, "a-desk", "A", 2)
    await old_device(t, "b-dev", "B", 1)
    await old_entry(t, "carol", "A", ["a-laptop"])
    await old_entry(t, "bob", "A", ["a-desk"])
    await old_entry(t, "carol2", "B", ["b-dev"])
    await old_projection(t, "carol", "A", 3, 9)
    await old_projection(t, "bob", "A", 2, 4)
    await old_projection(t, "carol2", "B", 1, 6)
    await old_known_user(t, "A", "bob", rename_seq=1)
    await old_known_user(t, "B", "carol2", rename_seq=2)

    assert await IdentityUpgrade(t.runtime, batch_size=1).run() == 2
    await t.drain()

    assert not await legacy_layout(t.runtime.db)
    alice = await stats_or_none(t, "bob")
    assert alice is not None
    assert (alice["userId"], alice["totalInvocations"]) == ("A", 5)
    assert alice["projectionVersion"] > 9
    bob = await stats_or_none(t, "carol2")
    assert bob is not None
    assert (bob["userId"], bob["totalInvocations"]) == ("B", 1)
    assert bob["projectionVersion"] > 6
    assert await stats_or_none(t, "carol") is None
    refreshes = await t.refreshes("A")
    assert refreshes[-1]["projectionVersion"] == alice["projectionVersion"]
    report = await verify(t.runtime.db, t.runtime.bus)
    assert report.clean, report.as_dict()
    assert await IdentityUpgrade(t.runtime).run() == 0  # once


async def test_upgrade_pending_pre_clock_registration_loses_a_freed_name_forever(
    telemetry: Telemetry,
) -> None:
    """FOUND, then fixed in the app: pre-clock seqs cannot order two users' claims, so the
    upgraded app re-asserts every user's current name on its clock when the clock starts
    (swamp_app/users/name_clock.py ensure_name_clock); those commands are part of the upgrade
    below, published after the old ones, as the new app does.

    At the deploy, the old app's queue still holds two commands: W's rename
    zed -> zed2 (W's per-user renameSeq 3) and Z's registration of the freed name "zed" (a
    pre-clock user_registered: seq 0). Telemetry applies Z's first (any order is legal: they
    have different ordering keys). Z is left nameless forever: GET /v1/stats?username=zed is
    404 although the app says Z is "zed", and verify is clean (all three names agree on None).

    Cause: identity/store.py claim_name (the ``holder.nameSeq > seq`` test) compares W's
    per-user renameSeq (converted to nameSeq by upgrade.py ``$rename``) with Z's seq 0 as if
    both were on the app's global name clock; messages.py documents seq 0 as "older than any
    rename", which is false for renames committed by the old app before the registration."""
    t = telemetry
    await old_device(t, "w-dev", "W", 3)
    await old_entry(t, "zed", "W", ["w-dev"])
    await old_projection(t, "zed", "W", 3, 5)
    await old_known_user(t, "W", "zed", rename_seq=2)  # W renamed twice before
    # Published by the old app, in this order, before the deploy:
    await t.runtime.commands.publish(
        UsernameChanged(oldUsername="zed", newUsername="zed2", userId="W", seq=3)
    )
    await t.runtime.commands.publish(UserRegistered(userId="Z", username="zed"))  # no seq
    await t.runtime.commands.publish(ApiKeyIssued(userId="Z", keyHash=api_key_hash("zkey")))
    # The upgraded app starts its clock above the old renameSeqs (3) and re-asserts names.
    await t.runtime.commands.publish_many(
        [
            UsernameChanged(oldUsername="zed2", newUsername="zed2", userId="W", seq=4),
            UsernameChanged(oldUsername="zed", newUsername="zed", userId="Z", seq=5),
        ]
    )

    await IdentityUpgrade(t.runtime).run()
    await hold(t, userId="W")
    await t.drain()
    await release(t)
    await t.drain()

    w = await stats_or_none(t, "zed2")
    assert w is not None
    assert (w["userId"], w["totalInvocations"]) == ("W", 3)
    z = await stats_or_none(t, "zed")
    assert z is not None, "Z registered 'zed' but telemetry left Z nameless"
    assert (z["userId"], z["totalInvocations"]) == ("Z", 0)


async def test_upgrade_keeps_the_history_of_a_user_whose_old_entry_was_handed_away(
    telemetry: Telemetry,
) -> None:
    """FINDING. Issue 14 sequence 2 as the old code left it mid-way: erin renamed to erin2
    (command not applied yet), frank registered "erin" and the old user_registered handler
    set ``userId: frank`` on erin's entry (with erin's device). After the upgrade and erin's
    rename, erin2 has 0 invocations instead of erin's 4, and verify reports drift: erin's
    device (holding her bucket, owned by her) is in frank's entry and not in hers.

    Cause: identity/upgrade.py _convert_entries (lines ~312-322) builds each user's devices only
    from the old entries' ``userId`` fields; it never adds the devices the user owns or has a
    bucket on (devices_of_user, as identity/store.py register_user does), so history stranded
    by the old layout's bugs stays stranded (I4), and a device moves to another userId's
    entry (I6)."""
    t = telemetry
    await old_device(t, "erin-dev", "E", 4)
    await old_entry(t, "erin", "F", ["erin-dev"])  # handed to frank by the old handler
    await old_projection(t, "erin", "F", 0, 2)
    await old_known_user(t, "E", "erin")
    await old_known_user(t, "F", "erin")
    await t.runtime.commands.publish(
        UsernameChanged(oldUsername="erin", newUsername="erin2", userId="E", seq=1)
    )

    await IdentityUpgrade(t.runtime).run()
    await t.drain()

    erin = await stats_or_none(t, "erin2")
    assert erin is not None
    frank = await stats_or_none(t, "erin")
    assert frank is not None
    report = await verify(t.runtime.db, t.runtime.bus)
    assert (erin["userId"], erin["totalInvocations"]) == ("E", 4), report.as_dict()
    assert (frank["userId"], frank["totalInvocations"]) == ("F", 0)
    assert "erin-dev" not in frank["distinctIds"]
    assert report.clean, report.as_dict()


async def test_two_replicas_upgrade_at_once_and_a_contested_name_goes_to_the_newer_claim(
    telemetry: Telemetry,
) -> None:
    """Holds. Two replicas run the upgrade at the same time (batch size 1) over old entries
    where two users' known_users hold the same name (bob's rename away not applied, alice's
    rename to "bob" applied): the newer renameSeq keeps the name whatever the order, every
    count is kept once, and the bus has one live projection per user."""
    import asyncio

    t = telemetry
    await old_device(t, "bob-dev", "B", 2)
    await old_device(t, "alice-dev", "A", 5)
    await old_entry(t, "bob", "A", ["alice-dev"])  # alice's entry, re-keyed to "bob"
    await old_entry(t, "bob-old", "B", ["bob-dev"])
    await old_projection(t, "bob", "A", 5, 7)
    await old_projection(t, "bob-old", "B", 2, 3)
    await old_known_user(t, "A", "bob", rename_seq=1)
    await old_known_user(t, "B", "bob")  # its rename to carol is still queued
    await t.runtime.commands.publish(
        UsernameChanged(oldUsername="bob", newUsername="carol", userId="B", seq=1)
    )
    results = await asyncio.gather(
        IdentityUpgrade(t.runtime, batch_size=1).run(),
        IdentityUpgrade(t.runtime, batch_size=1).run(),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    await t.drain()
    alice = await stats_or_none(t, "bob")
    bob = await stats_or_none(t, "carol")
    assert alice is not None
    assert bob is not None
    assert (alice["userId"], alice["totalInvocations"]) == ("A", 5)
    assert alice["projectionVersion"] > 7
    assert (bob["userId"], bob["totalInvocations"]) == ("B", 2)
    assert bob["projectionVersion"] > 3
    report = await verify(t.runtime.db, t.runtime.bus)
    assert report.clean, report.as_dict()
