"""Events aside in a collection of their own (processing/aside.py): ``events`` keeps its arrival
index alone and is never written after its insert, the copies aside carry the claim, and what
an older release kept aside in ``events`` is adopted once, never lost, never applied twice."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from shared_contracts.queue.documents import PARKED
from telemetry_service.collections import APPLIED_KEPT, EVENTS, EVENTS_ASIDE, MIGRATIONS, UNCLAIMED
from telemetry_service.consumers.commands import command_consumer
from telemetry_service.processing.aside import (
    ADOPTION,
    OLDER_RELEASE_ASIDE_INDEXES,
    adopt_older_release,
)
from telemetry_service.processing.set_aside import count_set_aside, purge_set_aside
from telemetry_service.projection.verify import verify
from tests.support import DbNames, expire_watcher_leases, swamp_club_cli, unapplied_events
from tests.telemetry.conftest import Telemetry, cli_event
from tests.telemetry.test_main_line import EventWrites, listened_to


def older_release_event(device: str, **state: Any) -> dict[str, Any]:
    """An event as the release before this one stored it and kept it aside."""
    event = cli_event(device)
    return {
        "_id": event["insert_id"],
        "raw": event,
        "distinctId": device,
        "keyHash": None,
        "receivedAt": datetime.now(UTC),
        "processed": False,
        "leaseUntil": UNCLAIMED,
        **state,
    }


async def older_release_layout(db: Any) -> None:
    """Its indexes for the events aside, and no record of this release's adoption yet."""
    await db[EVENTS].create_indexes(list(OLDER_RELEASE_ASIDE_INDEXES))
    await db[MIGRATIONS].delete_one({"_id": ADOPTION})


async def anonymous(telemetry: Telemetry, device: str) -> int:
    response = await telemetry.device(device)
    return int(response.json()["anonymous"]["invocations"]) if response.status_code == 200 else 0


async def test_stored_events_carry_their_arrival_index_alone(telemetry: Telemetry) -> None:
    """Every index on events is paid by every insert; those of the events aside are elsewhere."""
    indexes = await telemetry.runtime.db[EVENTS].index_information()
    assert set(indexes) == {"_id_", "arrival"}
    aside = await telemetry.runtime.db[EVENTS_ASIDE].index_information()
    assert aside["expire_applied"]["expireAfterSeconds"] == APPLIED_KEPT.total_seconds()


async def test_an_event_that_waits_for_its_key_is_copied_aside_as_sent_and_events_never_written(
    telemetry: Telemetry, mongo_uri: str
) -> None:
    """The copy is inserted, never upserted: the CLI's ``$repo_id`` is a field name an update
    refuses. Waiting, then applied from the copy; the stored event is not touched."""
    db = telemetry.runtime.db
    _, key = await telemetry.register("waiter", drain=False)  # telemetry has not seen the key
    event = cli_event("waiter-dev")
    assert "$repo_id" in event["properties"]
    await telemetry.post({"events": [event, cli_event("waiter-dev")]}, key)
    before = {d["_id"]: d async for d in db[EVENTS].find()}
    writes = EventWrites()
    async with listened_to(telemetry, mongo_uri, writes) as watcher:
        await watcher.drain()
        copy = await db[EVENTS_ASIDE].find_one({"_id": event["insert_id"]})
        assert copy is not None
        assert copy["raw"] == before[event["insert_id"]]["raw"]
        assert (copy["processed"], copy["attempts"]) == (False, 0)
        assert await unapplied_events(db) == 2
        await command_consumer(telemetry.runtime).drain()  # the key arrives
        await expire_watcher_leases(db)  # its retry interval passes
        assert await watcher.drain() == 2
    assert writes.seen_any
    assert writes.commands == []
    assert {d["_id"]: d async for d in db[EVENTS].find()} == before
    assert (await telemetry.stats("waiter"))["totalInvocations"] == 2
    applied = await db[EVENTS_ASIDE].find_one({"_id": event["insert_id"]})
    assert applied["processed"] is True
    assert applied["leaseUntil"] == PARKED  # never claimed again
    assert "claimToken" not in applied
    assert await unapplied_events(db) == 0
    assert await telemetry.watcher.drain() == 0


async def test_an_older_release_s_events_aside_are_adopted_once_with_their_state(
    telemetry: Telemetry,
) -> None:
    db = telemetry.runtime.db
    await older_release_layout(db)
    waiting = older_release_event("old-dev", seq=-5, attempts=1)
    dead = older_release_event(
        "old-dev", seq=-4, attempts=8, dead=True, leaseUntil=PARKED, lastError="poison"
    )
    applied = {**older_release_event("old-dev", seq=-3), "processed": True}
    unsequenced = older_release_event("old-dev")  # a release older still: no arrival number
    await db[EVENTS].insert_many([waiting, dead, applied, unsequenced])

    assert await adopt_older_release(db) == 3
    assert set(await db[EVENTS].index_information()) == {"_id_", "arrival"}
    copies = {d["_id"]: d async for d in db[EVENTS_ASIDE].find()}
    assert set(copies) == {waiting["_id"], dead["_id"], unsequenced["_id"]}
    assert copies[waiting["_id"]]["attempts"] == 1
    assert (copies[dead["_id"]]["dead"], copies[dead["_id"]]["lastError"]) == (True, "poison")
    assert copies[unsequenced["_id"]]["seq"] < 0  # numbered before every new event
    left = await db[EVENTS].count_documents({"processed": False})
    assert left == 0  # adopted: in one place only

    await telemetry.post(cli_event("old-dev"))
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "old-dev") == 3  # waiting, unsequenced, the new one
    assert await count_set_aside(db) == 1  # still set aside, for an operator
    assert await adopt_older_release(db) == 0  # once: later starts read one document
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "old-dev") == 3


async def test_replicas_starting_together_adopt_each_event_once(telemetry: Telemetry) -> None:
    """Two workers start at once over more than one transaction's worth of events kept aside:
    each event is adopted by one of them, and applied once."""
    db = telemetry.runtime.db
    await older_release_layout(db)
    older = [older_release_event("crowd-dev", seq=n - 2000) for n in range(1200)]
    await db[EVENTS].insert_many(older)
    adopted = await asyncio.gather(adopt_older_release(db), adopt_older_release(db))
    assert sum(adopted) == 1200
    assert await db[EVENTS_ASIDE].count_documents({}) == 1200
    assert await db[EVENTS].count_documents({"processed": False}) == 0
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "crowd-dev") == 1200
    assert await unapplied_events(db) == 0


async def test_the_events_adopt_command_and_verify(
    telemetry: Telemetry, mongo_uri: str, db_names: DbNames
) -> None:
    """An older release's watcher still running after this release's first start kept an event
    aside: verify names it, ``swamp-club events adopt`` adopts it, the watcher applies it."""
    db = telemetry.runtime.db
    assert await adopt_older_release(db) == 0  # this release's first start: nothing
    straggler = older_release_event("late-dev", seq=-1)
    await db[EVENTS].insert_one(straggler)
    report = await verify(db, telemetry.runtime.bus)
    assert (report.not_adopted_events, report.clean) == (1, False)
    assert await adopt_older_release(db) == 0  # a start does not look again
    code, output = await swamp_club_cli(
        mongo_uri, db_names, "events", "adopt", "--json", with_stderr=False
    )
    assert (code, json.loads(output)) == (0, {"adopted": 1})
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "late-dev") == 1
    report = await verify(db, telemetry.runtime.bus)
    assert (report.not_adopted_events, report.clean) == (0, True)


async def test_a_purged_event_can_be_sent_again(telemetry: Telemetry) -> None:
    """Purge deletes the stored event with its copy, in one transaction: the CLI's re-send of
    the same event id is then stored and counted as new, not answered as a duplicate."""
    db = telemetry.runtime.db
    event = cli_event("purge-dev")
    event["properties"]["startedAt"] = "9999-12-31T23:00:00-05:00"  # unreadable today
    await telemetry.post(cli_event("purge-dev"))
    stored = older_release_event("purge-dev", seq=-1)
    stored["_id"], stored["raw"] = event["insert_id"], event
    await db[EVENTS].insert_one(stored)
    await adopt_older_release(db, look=True)
    await telemetry.watcher.drain()
    assert await count_set_aside(db) == 1
    assert await purge_set_aside(db, ids=None) == 1
    assert await db[EVENTS].count_documents({"_id": event["insert_id"]}) == 0
    assert await db[EVENTS_ASIDE].count_documents({"_id": event["insert_id"]}) == 0
    fixed = cli_event("purge-dev", event_id=event["insert_id"])
    response = await telemetry.post(fixed)
    assert response.status_code == 202
    assert response.json() == {"accepted": 1, "duplicates": 0}
    await telemetry.watcher.drain()
    assert await anonymous(telemetry, "purge-dev") == 2
