"""The queue engine's state machine, one operation at a time."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient

from shared_contracts.messages import MESSAGE_TYPES, ScoreRefresh
from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS
from shared_contracts.queue.admin import purge_done, queue_stats, retry_dead
from shared_contracts.queue.documents import QUEUE_FIELDS, InvalidMessage, parse_message
from shared_contracts.queue.engine import LeaseLost, Queue, backoff_seconds, utcnow
from shared_contracts.queue.indexes import TTL_INDEX, ensure_queue_indexes
from tests.queue.conftest import FAST, Job
from tests.support import find_stage


def refresh(username: str, version: int) -> ScoreRefresh:
    return ScoreRefresh(
        userId=f"id-{username}",
        username=username,
        reason="ingest",
        projectionVersion=version,
        snapshot={"v": version},
    )


def lost_leases(queue: str) -> float:
    value = REGISTRY.get_sample_value(
        "swamp_queue_outcomes_total", {"queue": queue, "outcome": "lost_lease"}
    )
    return value or 0.0


def test_payload_fields_never_collide_with_queue_fields() -> None:
    for model in MESSAGE_TYPES.values():
        assert not (set(model.model_fields) - {"type", "schemaVersion"}) & QUEUE_FIELDS


async def test_coalescing_keeps_one_pending_message_with_the_last_payload(events: Queue) -> None:
    for version in range(1, 101):
        await events.publish(refresh("alice", version))
    pending = await events.collection.find({"status": "pending"}).to_list()
    assert len(pending) == 1
    assert pending[0]["projectionVersion"] == 100
    assert pending[0]["snapshot"] == {"v": 100}


async def test_concurrent_coalescing_publishes_still_leave_one_pending(events: Queue) -> None:
    await asyncio.gather(*(events.publish(refresh("bob", v)) for v in range(1, 31)))
    assert await events.collection.count_documents({"dedupeKey": "score_refresh:id-bob"}) == 1


async def test_with_one_active_a_new_publish_waits_as_exactly_one_pending(events: Queue) -> None:
    await events.publish(refresh("carol", 1))
    claim = await events.claim(worker="w")
    assert claim is not None
    for version in (2, 3, 4):
        await events.publish(refresh("carol", version))
    statuses = sorted(
        [(d["status"], d["projectionVersion"]) async for d in events.collection.find({})]
    )
    assert statuses == [("active", 1), ("pending", 4)]


async def test_publish_many_coalesces_in_one_bulk_write(events: Queue) -> None:
    await events.publish(refresh("dave", 1))
    await events.publish_many([refresh("dave", 2), refresh("erin", 1), refresh("erin", 2)])
    rows = sorted(
        [(d["username"], d["projectionVersion"]) async for d in events.collection.find({})]
    )
    assert rows == [("dave", 2), ("erin", 2)]


async def test_publish_inside_an_aborted_transaction_leaves_no_message(
    jobs: Queue, mongo_client: AsyncMongoClient[dict[str, Any]]
) -> None:
    class Abort(Exception):
        pass

    async def publish_then_abort() -> None:
        async with mongo_client.start_session() as session, await session.start_transaction():
            await jobs.publish(Job(n=1), session=session)
            raise Abort

    with pytest.raises(Abort):
        await publish_then_abort()
    assert await jobs.collection.count_documents({}) == 0

    async with mongo_client.start_session() as session, await session.start_transaction():
        await jobs.publish(Job(n=2), session=session)
    assert await jobs.collection.count_documents({}) == 1


async def test_publishing_on_the_wrong_queue_is_refused(jobs: Queue) -> None:
    with pytest.raises(ValueError, match="belongs on swamp_club_events"):
        await jobs.publish(refresh("frank", 1))


async def test_the_claim_query_is_served_by_the_claim_index(jobs: Queue, bus: Any) -> None:
    for n in range(20):
        await jobs.publish(Job(n=n))
    now = utcnow()
    explained = await bus.command(
        {
            "explain": {
                "findAndModify": TELEMETRY_COMMANDS,
                "query": {"status": "pending", "availableAt": {"$lte": now}},
                "sort": {"availableAt": 1},
                "update": {"$set": {"status": "active"}},
            }
        }
    )
    winning = explained["queryPlanner"]["winningPlan"]
    # The embedded server may add an in-memory SORT above the scan (SPEC section 8), so look for
    # the IXSCAN rather than for the absence of a SORT.
    scans = find_stage(winning, "IXSCAN")
    assert scans, winning
    assert scans[0]["keyPattern"] == {"status": 1, "availableAt": 1}
    assert not find_stage(winning, "COLLSCAN")


async def test_the_coalescing_publish_finds_the_pending_message_by_an_index(
    jobs: Queue, bus: Any
) -> None:
    """The upsert of every score refresh: on the embedded server, which never plans a query on
    a partial index, it scanned the whole collection, done messages included (a 500-refresh
    publish took 10 s with 1,000 messages stored, and grew with them)."""
    for n in range(20):
        await jobs.publish(Job(n=n))
    explained = await bus.command(
        {
            "explain": {
                "find": TELEMETRY_COMMANDS,
                "filter": {"dedupeKey": "score:u1", "status": "pending"},
            }
        }
    )
    winning = explained["queryPlanner"]["winningPlan"]
    assert find_stage(winning, "IXSCAN"), winning
    assert not find_stage(winning, "COLLSCAN")


async def test_a_late_ack_after_the_lease_moved_on_is_rejected(jobs: Queue) -> None:
    await jobs.publish(Job(n=1))
    stale = await jobs.claim(worker="stale")
    assert stale is not None
    await jobs.collection.update_one({"_id": stale.id}, {"$set": {"leaseUntil": utcnow()}})
    assert await jobs.reap() == 1
    fresh = await jobs.claim(worker="fresh")
    assert fresh is not None
    assert fresh.id == stale.id
    assert fresh.attempts == 2

    before = lost_leases(TELEMETRY_COMMANDS)
    assert await jobs.ack(stale) is False
    assert await jobs.renew(stale) is False
    assert await jobs.fail(stale, RuntimeError("late")) is False
    assert lost_leases(TELEMETRY_COMMANDS) == before + 3
    assert await jobs.ack(fresh) is True
    assert (await jobs.collection.find_one({"_id": fresh.id}))["status"] == "done"


async def test_ack_inside_a_transaction_raises_when_the_lease_is_lost(
    jobs: Queue, mongo_client: AsyncMongoClient[dict[str, Any]]
) -> None:
    await jobs.publish(Job(n=1))
    claim = await jobs.claim(worker="w")
    assert claim is not None
    await jobs.collection.update_one({"_id": claim.id}, {"$set": {"claimToken": "someone-else"}})

    async def ack_in_transaction() -> None:
        async with mongo_client.start_session() as session, await session.start_transaction():
            await jobs.ack(claim, session=session)

    with pytest.raises(LeaseLost):
        await ack_in_transaction()


@given(st.integers(min_value=1, max_value=40), st.floats(0, 1), st.floats(0, 1))
def test_backoff_never_shrinks_and_never_exceeds_the_cap(
    attempt: int, r1: float, r2: float
) -> None:
    config = replace(FAST, backoff_base_seconds=0.5, backoff_max_seconds=60)
    first = backoff_seconds(attempt, config, rng=lambda: r1)
    second = backoff_seconds(attempt + 1, config, rng=lambda: r2)
    assert 0 < first <= 60
    assert 0 < second <= 60
    assert second >= first or second >= 30  # only the cap stops the growth


async def test_fail_backs_off_then_dies_after_max_attempts_and_retry_revives(jobs: Queue) -> None:
    await jobs.publish(Job(n=1))
    delays = []
    for attempt in range(1, FAST.max_attempts + 1):
        await jobs.collection.update_one({}, {"$set": {"availableAt": utcnow()}})
        claim = await jobs.claim(worker="w")
        assert claim is not None
        assert claim.attempts == attempt
        await jobs.fail(claim, ValueError(f"boom {attempt}"))
        stored = await jobs.collection.find_one({"_id": claim.id})
        if stored["status"] == "pending":
            delays.append((stored["availableAt"] - stored["lastError"]["at"]).total_seconds())
    assert stored["status"] == "dead"
    assert stored["lastError"]["type"] == "ValueError"
    assert stored["lastError"]["message"] == "boom 3"
    assert "ValueError: boom 3" in stored["lastError"]["traceback"]
    assert "doneAt" not in stored  # dead letters never expire by TTL
    assert len(delays) == 2
    assert delays[1] >= delays[0] > 0

    assert await retry_dead(jobs.collection, ids=[str(claim.id)], now=utcnow()) == 1
    revived = await jobs.claim(worker="w")
    assert revived is not None
    assert revived.attempts == 1


async def test_release_returns_the_claim_without_spending_an_attempt(jobs: Queue) -> None:
    await jobs.publish(Job(n=1))
    claim = await jobs.claim(worker="w")
    assert claim is not None
    assert await jobs.release(claim)
    stored = await jobs.collection.find_one({"_id": claim.id})
    assert (stored["status"], stored["attempts"], stored["claimToken"]) == ("pending", 0, None)


async def test_done_messages_carry_done_at_for_the_ttl_index(jobs: Queue, bus: Any) -> None:
    await jobs.publish(Job(n=1))
    claim = await jobs.claim(worker="w")
    assert claim is not None
    await jobs.ack(claim)
    stored = await jobs.collection.find_one({"_id": claim.id})
    assert stored["doneAt"] >= stored["createdAt"]
    info = await jobs.collection.index_information()
    assert info[TTL_INDEX]["expireAfterSeconds"] == 3600
    await ensure_queue_indexes(bus, done_retention_seconds=7200)  # a changed setting applies
    info = await jobs.collection.index_information()
    assert info[TTL_INDEX]["expireAfterSeconds"] == 7200
    assert await purge_done(jobs.collection) == 1


async def test_stats_count_per_status_and_type(jobs: Queue) -> None:
    for n in range(3):
        await jobs.publish(Job(n=n))
    claim = await jobs.claim(worker="w")
    assert claim is not None
    stats = await queue_stats(jobs.collection, now=utcnow() + timedelta(seconds=5))
    assert stats["byStatus"] == {"pending": 2, "active": 1, "done": 0, "dead": 0}
    assert stats["byType"] == {"job": {"pending": 2, "active": 1}}
    assert stats["oldestPendingAgeSeconds"] >= 5


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"schemaVersion": 1}, "missing or non-string 'type'"),
        ({"type": "nope", "schemaVersion": 1}, "unknown message type 'nope'"),
        ({"type": "score_refresh", "schemaVersion": 3}, "unsupported schemaVersion 3"),
        ({"type": "score_refresh", "schemaVersion": True}, "unsupported schemaVersion True"),
        # Version 1 named only a username, which may belong to someone else by now.
        (
            {"type": "score_refresh", "schemaVersion": 1, "username": "alice"},
            "unsupported schemaVersion 1",
        ),
        (
            {"type": "score_refresh", "schemaVersion": 2, "userId": "u1", "username": "Bad Name"},
            "invalid score_refresh: username",
        ),
    ],
)
def test_unreadable_documents_raise_invalid_message(document: dict[str, Any], reason: str) -> None:
    types = {k: v for k, v in MESSAGE_TYPES.items() if v.QUEUE == SWAMP_CLUB_EVENTS}
    with pytest.raises(InvalidMessage, match=reason.replace("(", r"\(")):
        parse_message(document, types)


async def _active_with_newer_pending(events: Queue) -> Any:
    await events.publish(refresh("gina", 1))
    claim = await events.claim(worker="w")
    assert claim is not None
    await events.publish(refresh("gina", 2))  # the newer payload waits as the one pending
    return claim


async def _assert_superseded(events: Queue, claim: Any) -> None:
    old = await events.collection.find_one({"_id": claim.id})
    assert old["status"] == "done"
    assert old["supersededAt"] is not None
    waiting = await events.collection.find({"status": "pending"}).to_list()
    assert [d["projectionVersion"] for d in waiting] == [2]


async def test_a_failed_coalesced_message_is_superseded_by_the_newer_pending_one(
    events: Queue,
) -> None:
    claim = await _active_with_newer_pending(events)
    assert await events.fail(claim, RuntimeError("transient")) is True
    await _assert_superseded(events, claim)


async def test_a_released_coalesced_message_is_superseded_by_the_newer_pending_one(
    events: Queue,
) -> None:
    claim = await _active_with_newer_pending(events)
    assert await events.release(claim) is True
    await _assert_superseded(events, claim)


async def test_reaping_a_coalesced_message_never_collides_with_the_newer_pending_one(
    events: Queue,
) -> None:
    claim = await _active_with_newer_pending(events)
    await events.collection.update_one({"_id": claim.id}, {"$set": {"leaseUntil": utcnow()}})
    assert await events.reap() == 1
    await _assert_superseded(events, claim)
    follower = await events.claim(worker="w")
    assert follower is not None
    assert follower.document["projectionVersion"] == 2


async def test_retrying_a_dead_coalesced_message_with_a_newer_pending_one(events: Queue) -> None:
    claim = await _active_with_newer_pending(events)
    await events.dead_letter(claim, RuntimeError("poison"))
    assert await retry_dead(events.collection, ids=None, now=utcnow()) == 0
    await _assert_superseded(events, claim)


async def test_one_refresh_per_user_is_active_at_a_time(events: Queue) -> None:
    await events.publish(refresh("hank", 1))
    first = await events.claim(worker="a")
    assert first is not None
    await events.publish(refresh("hank", 2))
    assert await events.claim(worker="b") is None  # waits behind the active one
    await events.publish(refresh("hank", 3))  # and keeps absorbing newer snapshots
    assert await events.ack(first)
    second = await events.claim(worker="b")
    assert second is not None
    assert second.document["projectionVersion"] == 3
