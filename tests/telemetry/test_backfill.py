"""The one-time backfill (#501, I7): corrects projections AND re-scores, resumes, runs once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from shared_contracts import failpoints
from shared_contracts.mongo import make_client
from telemetry_service import backfill
from telemetry_service.backfill import AFTER_BATCH, MARKER, Backfill
from telemetry_service.collections import (
    IDENTITY_MAP,
    KNOWN_USERS,
    MIGRATIONS,
    USER_METRICS,
    USERNAME_METRICS,
)
from telemetry_service.projection.verify import find_drift
from telemetry_service.runtime import TelemetryRuntime
from tests.support import DbNames, SeenCommands, swamp_club_cli
from tests.telemetry.conftest import Telemetry

STALE_VERSION = 3


@pytest.fixture(autouse=True)
def no_failpoints() -> Iterator[None]:
    yield
    failpoints.disarm()


def bucket(invocations: int) -> dict[str, object]:
    seen = datetime(2026, 3, 1, tzinfo=UTC)
    return {
        "invocations": invocations,
        "successCount": invocations,
        "commandCounts": {"model": invocations},
        "activeDays": ["2026-03-01"],
        "firstSeenAt": seen,
        "lastSeenAt": seen,
    }


async def seed_dormant_users(runtime: TelemetryRuntime, count: int) -> list[str]:
    """Users whose devices hold anonymous history the stored projection never counted.
    Returns their userIds (``uid00``, ...; user ``uidNN`` is called ``dormant-NN``)."""
    db = runtime.db
    user_ids = [f"uid{i:02d}" for i in range(count)]
    for i, user_id in enumerate(user_ids):
        username = f"dormant-{i:02d}"
        devices = [f"{username}-laptop", f"{username}-desk"]
        await db[USER_METRICS].insert_many(
            [
                {"_id": devices[0], "ownerUserId": user_id, "anon": bucket(4), "userIds": []},
                {
                    "_id": devices[1],
                    "ownerUserId": user_id,
                    "anon": bucket(1),
                    "users": {user_id: bucket(2)},
                    "userIds": [user_id],
                },
            ]
        )
        await db[KNOWN_USERS].insert_one({"_id": user_id, "username": username, "nameSeq": i})
        await db[IDENTITY_MAP].insert_one(
            {"_id": user_id, "username": username, "distinctIds": devices}
        )
        await db[USERNAME_METRICS].insert_one(
            {
                "_id": user_id,
                "username": username,
                "totalInvocations": 2,
                "projectionVersion": STALE_VERSION,
            }
        )
    return user_ids


def quick(runtime: TelemetryRuntime, batch: int = 5) -> TelemetryRuntime:
    settings = runtime.settings.model_copy(
        update={"backfill_batch_size": batch, "backfill_lease_seconds": 0.3}
    )
    return TelemetryRuntime(settings=settings, client=runtime.client)


async def versions(runtime: TelemetryRuntime) -> dict[str, int]:
    return {
        d["_id"]: d["projectionVersion"]
        async for d in runtime.db[USERNAME_METRICS].find({}, {"projectionVersion": 1})
    }


async def run_counted(runtime: TelemetryRuntime, mongo_uri: str) -> SeenCommands:
    """Run the backfill to the end on a client of its own; the commands it sent."""
    commands = SeenCommands()
    client = make_client(mongo_uri, app_name="backfill", event_listeners=[commands])
    try:
        counted = TelemetryRuntime(settings=runtime.settings, client=client)
        assert await Backfill(counted).run_if_needed()
    finally:
        await client.close()
    return commands


async def backfill_refreshes(runtime: TelemetryRuntime) -> dict[str, int]:
    found: dict[str, int] = {}
    async for message in runtime.refreshes.collection.find({"reason": "backfill"}):
        found[message["userId"]] = message["projectionVersion"]
    return found


async def test_the_backfill_corrects_every_projection_and_publishes_its_refresh(
    telemetry: Telemetry,
) -> None:
    runtime = quick(telemetry.runtime)
    user_ids = await seed_dormant_users(runtime, 12)
    assert len(await find_drift(runtime.db)) == 12
    assert await Backfill(runtime).run_if_needed()
    assert await find_drift(runtime.db) == []
    assert (await telemetry.stats("dormant-00"))["totalInvocations"] == 4 + 1 + 2
    assert await versions(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)
    assert await backfill_refreshes(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)
    marker = await runtime.db[MIGRATIONS].find_one({"_id": MARKER})
    assert (marker["status"], marker["users"], marker["batches"]) == ("done", 12, 3)


async def test_a_crash_after_two_batches_resumes_at_the_third(telemetry: Telemetry) -> None:
    runtime = quick(telemetry.runtime)
    user_ids = await seed_dormant_users(runtime, 12)
    failpoints.arm(AFTER_BATCH, skip=1, times=1)  # the second batch commits, then the crash
    with pytest.raises(failpoints.FailpointError):
        await Backfill(runtime, owner="crashed").run_if_needed()
    marker = await runtime.db[MIGRATIONS].find_one({"_id": MARKER})
    assert (marker["status"], marker["lastUserId"], marker["batches"]) == (
        "running",
        user_ids[9],
        2,
    )
    assert not await Backfill(runtime, owner="too-early").run_if_needed()  # lease still held
    await asyncio.sleep(0.4)  # the crashed replica's lease expires
    assert await Backfill(runtime, owner="restarted").run_if_needed()
    marker = await runtime.db[MIGRATIONS].find_one({"_id": MARKER})
    assert (marker["status"], marker["batches"], marker["users"]) == ("done", 3, 12)
    # One projection write per username: no batch was redone.
    assert await versions(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)
    assert await backfill_refreshes(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)


async def test_after_completion_it_does_not_run_again(telemetry: Telemetry) -> None:
    runtime = quick(telemetry.runtime)
    user_ids = await seed_dormant_users(runtime, 3)
    assert await Backfill(runtime).run_if_needed()
    assert not await Backfill(runtime).run_if_needed()
    await Backfill(runtime).run_in_background()  # returns at once: the marker is done
    assert await versions(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)


async def test_two_replicas_starting_together_run_it_once(telemetry: Telemetry) -> None:
    runtime = quick(telemetry.runtime)
    runtime = TelemetryRuntime(
        settings=runtime.settings.model_copy(update={"backfill_lease_seconds": 30}),
        client=runtime.client,
    )
    user_ids = await seed_dormant_users(runtime, 6)
    ran = await asyncio.gather(Backfill(runtime).run_if_needed(), Backfill(runtime).run_if_needed())
    assert sorted(ran) == [False, True]
    assert await versions(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)


async def test_the_operator_commands(
    telemetry: Telemetry, mongo_uri: str, db_names: DbNames
) -> None:
    await seed_dormant_users(telemetry.runtime, 4)

    async def swamp_club(*args: str) -> tuple[int, str]:
        code, output = await swamp_club_cli(
            mongo_uri, db_names, "telemetry", "backfill", *args, with_stderr=False
        )
        return code, output.strip()

    assert await swamp_club("--dry-run") == (0, "4 projection(s) would change")
    assert (await swamp_club("--status"))[1] == '{"status": "pending"}'
    assert await swamp_club() == (0, "backfill ran: done, 4 users")
    assert await swamp_club("--dry-run") == (0, "0 projection(s) would change")
    assert (await swamp_club())[1].startswith("backfill did not run")
    assert await swamp_club("--rerun") == (0, "backfill ran: done, 4 users")
    assert (await swamp_club("--status", "--rerun"))[0] == 2


async def test_devices_owned_outside_the_batch_or_by_nobody_are_folded_too(
    telemetry: Telemetry, mongo_uri: str
) -> None:
    """A batch reads its devices by the range of its users as owners (one command), and by id
    only those owned by someone outside the batch or by nobody yet."""
    runtime = quick(telemetry.runtime, batch=2)
    user_ids = await seed_dormant_users(runtime, 4)  # batches: uid00-uid01, uid02-uid03
    db = runtime.db
    users = {user_ids[0]: bucket(5), user_ids[3]: bucket(6)}
    await db[USER_METRICS].insert_many(
        [
            # owned by uid03, in the next batch; uid00 has a bucket on it too
            {"_id": "shared", "ownerUserId": user_ids[3], "users": users,
             "userIds": sorted(users)},
            # no owner recorded (anonymous history is nobody's): read by id
            {"_id": "ownerless", "anon": bucket(50), "users": {user_ids[0]: bucket(7)},
             "userIds": [user_ids[0]]},
        ]
    )  # fmt: skip
    await db[IDENTITY_MAP].update_one(
        {"_id": user_ids[0]}, {"$push": {"distinctIds": {"$each": ["shared", "ownerless"]}}}
    )
    await db[IDENTITY_MAP].update_one({"_id": user_ids[3]}, {"$push": {"distinctIds": "shared"}})
    commands = await run_counted(runtime, mongo_uri)
    assert await find_drift(db) == []
    assert (await telemetry.stats("dormant-00"))["totalInvocations"] == 4 + 1 + 2 + 5 + 7
    assert (await telemetry.stats("dormant-03"))["totalInvocations"] == 4 + 1 + 2 + 6
    # batch 1: the owners' range, then by id the two owned elsewhere; batch 2: the range only
    assert commands.count("find", USER_METRICS) == 3
    assert commands.count("commitTransaction") == 2  # one per batch


async def test_users_are_walked_by_pages_of_ids_across_their_boundaries(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backfill, "ID_PAGE", 4)  # pages of 4 ids, batches of 3: 3+1, 3+1, 3+1
    runtime = quick(telemetry.runtime, batch=3)
    user_ids = await seed_dormant_users(runtime, 12)
    assert await Backfill(runtime).run_if_needed()
    assert await find_drift(runtime.db) == []
    assert await versions(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)
    marker = await runtime.db[MIGRATIONS].find_one({"_id": MARKER})
    assert (marker["status"], marker["users"], marker["batches"]) == ("done", 12, 6)
    assert marker["lastUserId"] == user_ids[-1]


async def test_a_run_costs_four_commands_besides_its_batches(
    telemetry: Telemetry, mongo_uri: str
) -> None:
    """The lease (which creates the marker on a first run), the count for progress, the one
    page of ids (shorter than a page: no read of an empty one after it), the finish; and seven
    per batch (the module's docstring). At 1,000 users that was 21 commands, 0.021 a username:
    the target is 0.02 (issue 17, bench/backfill.py)."""
    runtime = quick(telemetry.runtime, batch=2)
    user_ids = await seed_dormant_users(runtime, 4)
    assert await runtime.db[MIGRATIONS].find_one({"_id": MARKER}) is None  # a first run
    commands = await run_counted(runtime, mongo_uri)
    assert await versions(runtime) == dict.fromkeys(user_ids, STALE_VERSION + 1)
    assert commands.names(MIGRATIONS) == ["findAndModify", "update", "update", "update"]
    assert commands.count("find", IDENTITY_MAP) == 1 + 2  # the page, then each batch's entries
    assert len(commands.seen) == 4 + 2 * 7
    marker = await runtime.db[MIGRATIONS].find_one({"_id": MARKER})
    assert (marker["status"], marker["users"], marker["batches"]) == ("done", 4, 2)
    assert marker["createdAt"] is not None
    assert marker["lastUserId"] == user_ids[-1]


async def test_a_marker_done_or_leased_is_not_taken(telemetry: Telemetry) -> None:
    """The lease's upsert meets the existing marker's _id: not taken, and the marker as it was."""
    runtime = quick(telemetry.runtime)
    runtime = TelemetryRuntime(
        settings=runtime.settings.model_copy(update={"backfill_lease_seconds": 30}),
        client=runtime.client,
    )
    await seed_dormant_users(runtime, 2)
    marker = runtime.db[MIGRATIONS]
    assert await Backfill(runtime, owner="first")._acquire() is not None
    held = await marker.find_one({"_id": MARKER})
    assert await Backfill(runtime, owner="second")._acquire() is None  # leased to "first"
    assert await marker.find_one({"_id": MARKER}) == held
    await marker.update_one({"_id": MARKER}, {"$set": {"status": "done", "leaseUntil": None}})
    assert await Backfill(runtime, owner="third")._acquire() is None
    assert await marker.count_documents({}) == 1


async def test_a_reset_after_the_last_batch_is_not_undone_by_the_run_finishing(
    telemetry: Telemetry,
) -> None:
    """Found by attacking the lease: the run's finish matched on its owner alone, so an
    operator's reset between its last batch and its finish was marked done, and the re-run it
    asked for never came."""
    runtime = quick(telemetry.runtime, batch=2)
    await seed_dormant_users(runtime, 2)
    run = Backfill(runtime, owner="A")
    finish = run._finish

    async def reset_then_finish() -> None:
        await Backfill(runtime).reset()
        await finish()

    run._finish = reset_then_finish  # type: ignore[method-assign]
    assert await run.run_if_needed()
    marker = await runtime.db[MIGRATIONS].find_one({"_id": MARKER})
    assert marker is not None
    assert (marker["status"], marker["reruns"]) == ("pending", 1)
    assert await Backfill(runtime, owner="rerun").run_if_needed()  # the re-run asked for
    marker = await runtime.db[MIGRATIONS].find_one({"_id": MARKER})
    assert marker is not None
    assert (marker["status"], marker["users"]) == ("done", 2)
