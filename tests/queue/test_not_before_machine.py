"""A state machine over score refreshes published now or not before a later time, claimed,
acked, failed, released, reaped after a worker died, with a fake clock. After every step the
newest version of each user is applied or waiting in a pending/active message; a claim never
hands out a message before its time; at most one active refresh per user; an empty claim reports
the earliest waiting time; at the end everything drains to the newest version."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shared_contracts.messages import ScoreRefresh, types_for_queue
from shared_contracts.mongo import in_transaction, make_client
from shared_contracts.names import SWAMP_CLUB_EVENTS
from shared_contracts.queue.admin import retry_dead
from shared_contracts.queue.documents import ACTIVE, DEAD, PARKED, PENDING
from shared_contracts.queue.engine import Claim, Queue
from shared_contracts.queue.indexes import ensure_queue_indexes
from tests.queue.conftest import FAST
from tests.support import DbNames

USERS = ["a", "b", "c"]
CONFIG = replace(FAST, max_attempts=10_000, lease_seconds=5)


def aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


class NotBeforeMachine(RuleBasedStateMachine):
    def __init__(self, uri: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.names = DbNames.unique()
        self.client = make_client(uri, app_name="not-before-machine")
        bus = self.client[self.names.bus]
        self.run(ensure_queue_indexes(bus, done_retention_seconds=10**8))
        self.clock = Clock()
        types = types_for_queue(SWAMP_CLUB_EVENTS)
        self.workers = [
            Queue(bus[SWAMP_CLUB_EVENTS], config=CONFIG, types=types, clock=self.clock)
            for _ in range(2)
        ]
        self.publisher = Queue(bus[SWAMP_CLUB_EVENTS], config=CONFIG, types=types, clock=self.clock)
        self.version = dict.fromkeys(USERS, 0)
        self.applied = dict.fromkeys(USERS, 0)
        self.active: list[tuple[int, Claim]] = []  # (worker, claim)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self._quiesce())
        finally:
            self.run(self.client.drop_database(self.names.bus))
            self.run(self.client.close())
            self.loop.close()

    async def _docs(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return await self.publisher.collection.find(query or {}).to_list()

    # --- rules -------------------------------------------------------------------------

    @rule(user=st.sampled_from(USERS), delay=st.sampled_from([None, 0.5, 2.0, 30.0]),
          many=st.booleans())  # fmt: skip
    def publish(self, user: str, delay: float | None, many: bool) -> None:
        self.version[user] += 1
        message = ScoreRefresh(userId=user, username=None, reason="ingest",
                               projectionVersion=self.version[user],
                               snapshot={"v": self.version[user]})  # fmt: skip
        if many or delay is not None:
            at = None if delay is None else self.clock.now + timedelta(seconds=delay)
            self.run(self.publisher.publish_many([message], not_before=at))
        else:
            self.run(self.publisher.publish(message))

    @rule(user=st.sampled_from(USERS), delay=st.sampled_from([None, 2.0]),
          worker=st.integers(0, 1), limit=st.sampled_from([1, 10]))  # fmt: skip
    def held_publish(self, user: str, delay: float | None, worker: int, limit: int) -> None:
        """A watcher batch: holds the user's pending refresh, the app claims meanwhile, the
        batch publishes into it (not before a time if the user bursts) and commits."""
        self.version[user] += 1
        message = ScoreRefresh(userId=user, username=None, reason="ingest",
                               projectionVersion=self.version[user],
                               snapshot={"v": self.version[user]})  # fmt: skip
        at = None if delay is None else self.clock.now + timedelta(seconds=delay)
        self.run(self._held_publish(message, at, worker, limit))

    async def _held_publish(self, message: ScoreRefresh, at: datetime | None, worker: int,
                            limit: int) -> None:  # fmt: skip
        tries = 0

        async def batch(session: Any) -> None:
            nonlocal tries
            tries += 1
            await self.publisher.hold_pending([message.ordering_key()], session=session)
            if tries == 1:
                queue = self.workers[worker]
                for claim in await queue.claim_many(worker=f"w{worker}", limit=limit):
                    assert aware(claim.document["availableAt"]) <= self.clock.now
                    self.active.append((worker, claim))
            await self.publisher.publish_many([message], session=session, not_before=at)

        await in_transaction(self.client, batch)
        users = [c.document["userId"] for _, c in self.active]
        assert len(users) == len(set(users)), f"two active refreshes of one user: {users}"

    @rule(worker=st.integers(0, 1), limit=st.sampled_from([1, 2, 10]))
    def claim(self, worker: int, limit: int) -> None:
        queue = self.workers[worker]
        claims = self.run(queue.claim_many(worker=f"w{worker}", limit=limit))
        for claim in claims:
            assert aware(claim.document["availableAt"]) <= self.clock.now, claim.document
            self.active.append((worker, claim))
        users = [c.document["userId"] for _, c in self.active]
        assert len(users) == len(set(users)), f"two active refreshes of one user: {users}"
        if not claims and not queue.held_elsewhere:
            waiting = [aware(d["availableAt"]) for d in self.run(self._docs({"status": PENDING}))
                       if aware(d["availableAt"]) != PARKED]  # fmt: skip
            future = [at for at in waiting if at > self.clock.now]
            assert not [at for at in waiting if at <= self.clock.now], "claimable left behind"
            assert queue.next_available_at == (min(future) if future else None)

    @precondition(lambda self: self.active)
    @rule(index=st.integers(0, 50))
    def ack(self, index: int) -> None:
        worker, claim = self.active.pop(index % len(self.active))
        queue = self.workers[worker]
        if self.run(queue.ack(claim)):
            user = claim.document["userId"]
            self.applied[user] = max(self.applied[user], claim.document["projectionVersion"])

    @precondition(lambda self: self.active)
    @rule(index=st.integers(0, 50))
    def fail(self, index: int) -> None:
        worker, claim = self.active.pop(index % len(self.active))
        self.run(self.workers[worker].fail(claim, RuntimeError("boom")))

    @precondition(lambda self: self.active)
    @rule(index=st.integers(0, 50))
    def release(self, index: int) -> None:
        worker, claim = self.active.pop(index % len(self.active))
        self.run(self.workers[worker].release(claim))

    @precondition(lambda self: self.active)
    @rule(index=st.integers(0, 50))
    def worker_dies(self, index: int) -> None:
        self.active.pop(index % len(self.active))  # its lease runs out

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += timedelta(seconds=seconds)
        live = []
        for worker, claim in self.active:  # a live worker renews its lease
            if self.run(self.workers[worker].renew(claim)):
                live.append((worker, claim))
        self.active = live

    @precondition(lambda self: self.active)
    @rule(index=st.integers(0, 50))
    def dead_letter(self, index: int) -> None:
        worker, claim = self.active.pop(index % len(self.active))
        self.run(self.workers[worker].dead_letter(claim, RuntimeError("dead")))

    @rule()
    def operator_retry(self) -> None:
        self.run(retry_dead(self.publisher.collection, ids=None, now=self.clock.now))

    @rule()
    def reap(self) -> None:
        self.run(self.workers[0].reap())

    # --- invariants --------------------------------------------------------------------

    @invariant()
    def newest_is_applied_or_waiting(self) -> None:
        docs = self.run(self._docs({"status": {"$in": [PENDING, ACTIVE, DEAD]}}))
        for user in USERS:
            if self.applied[user] >= self.version[user]:
                continue
            versions = [d["projectionVersion"] for d in docs if d["userId"] == user]
            assert self.version[user] in versions, (user, self.version[user], docs)
            pending = [d for d in docs if d["userId"] == user and d["status"] == PENDING]
            assert len(pending) <= 1, pending

    async def _quiesce(self) -> None:
        for _ in range(200):
            for worker, claim in self.active:
                if await self.workers[worker].ack(claim):
                    user = claim.document["userId"]
                    self.applied[user] = max(self.applied[user],
                                             claim.document["projectionVersion"])  # fmt: skip
            self.active = []
            await retry_dead(self.publisher.collection, ids=None, now=self.clock.now)
            await self.workers[0].reap()
            for claim in await self.workers[0].claim_many(worker="w0", limit=100):
                self.active.append((0, claim))
            if not self.active:
                left = await self._docs({"status": {"$in": [PENDING, ACTIVE]}})
                if not left:
                    break
                self.clock.now += timedelta(seconds=7)
        assert self.applied == self.version, (self.applied, self.version,
                                              await self._docs())  # fmt: skip


def test_not_before_state_machine(mongo_uri: str) -> None:
    run_state_machine_as_test(
        lambda: NotBeforeMachine(mongo_uri),
        settings=settings(max_examples=40, stateful_step_count=30, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )  # fmt: skip
