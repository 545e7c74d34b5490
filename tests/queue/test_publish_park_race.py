"""A message published while an earlier one of its key is unfinished is stored parked. If that
earlier one finishes between the publish's check and the publish's commit, the finish's
promotion cannot see the new message: it stayed parked until the reaper's promotion, half a
lease later (15 s by default; found by an attack on b2cb265, recorded in the README then).
Now the publish promotes its own key once its message is visible (after the commit, in a
transaction), so one of the two always sees the other."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.asynchronous.client_session import AsyncClientSession

from shared_contracts import mongo
from shared_contracts.queue.documents import PARKED, PENDING
from shared_contracts.queue.engine import Queue
from tests.queue.conftest import FAST, Job
from tests.queue.test_ordering_races import HookedCollection


async def _earlier_finishes_during_the_check(jobs: Queue) -> Queue:
    """m0 of key a is claimed; the returned publisher's check for unfinished messages of a
    reads once, then m0 is acknowledged (and its finish promotes what it can see)."""
    await jobs.publish(Job(n=0, key="a"))
    first = await jobs.claim(worker="first")
    assert first is not None
    hooked = HookedCollection(jobs.collection)

    async def finish_first() -> None:
        assert await jobs.ack(first)

    hooked.hook = finish_first
    return Queue(hooked, config=FAST, types=jobs.types)  # type: ignore[arg-type]


@pytest.mark.parametrize("in_transaction", [True, False])
async def test_a_message_parked_while_the_earlier_one_finished_is_claimable_at_once(
    jobs: Queue, in_transaction: bool
) -> None:
    publisher = await _earlier_finishes_during_the_check(jobs)
    if in_transaction:

        async def publish(session: AsyncClientSession) -> None:
            await publisher.publish(Job(n=1, key="a"), session=session)

        await mongo.in_transaction(jobs.collection.database.client, publish)
    else:
        await publisher.publish(Job(n=1, key="a"))

    follower: dict[str, Any] | None = await jobs.collection.find_one({"n": 1})
    assert follower is not None
    assert follower["status"] == PENDING, follower
    assert follower["availableAt"] != PARKED, follower
    claim = await jobs.claim(worker="next")  # no reap: at once
    assert claim is not None
    assert claim.document["n"] == 1


async def test_a_publish_behind_an_unfinished_message_stays_parked(jobs: Queue) -> None:
    """The promotion after a publish lets nothing overtake: m0 still active, m1 waits."""
    await jobs.publish(Job(n=0, key="a"))
    assert await jobs.claim(worker="first") is not None

    async def publish(session: AsyncClientSession) -> None:
        await jobs.publish(Job(n=1, key="a"), session=session)

    await mongo.in_transaction(jobs.collection.database.client, publish)
    follower = await jobs.collection.find_one({"n": 1})
    assert follower is not None
    assert follower["availableAt"] == PARKED
    assert await jobs.claim(worker="next") is None


async def test_a_publisher_gone_before_its_promotion_leaves_the_message_to_the_reaper(
    jobs: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies between the publish's commit and its promotion (the follow-up is never
    run): the message stays parked behind nothing, and the reaper's promotion hands it out."""
    publisher = await _earlier_finishes_during_the_check(jobs)
    monkeypatch.setattr(mongo, "after_commit", lambda session, follow_up: True)  # dies here

    async def publish(session: AsyncClientSession) -> None:
        await publisher.publish(Job(n=1, key="a"), session=session)

    await mongo.in_transaction(jobs.collection.database.client, publish)
    assert await jobs.claim(worker="next") is None  # parked, nothing ahead of it
    await jobs.reap()
    claim = await jobs.claim(worker="next")
    assert claim is not None
    assert claim.document["n"] == 1
