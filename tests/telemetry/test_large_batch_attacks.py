"""Attacks on main-line batches that are the whole backlog (up to INGEST_MAX_BATCH_SIZE): a
thousand events in one transaction with poison and flaky events scattered through them, two
replicas with short leases racing over such a backlog, and a worker killed twice inside it.
Each must count every innocent event exactly once (I2), set aside only the poison (I11) and
leave every user's stats exact."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from typing import Any

import pytest

from shared_contracts import failpoints
from telemetry_service.collections import EVENTS_ASIDE
from telemetry_service.processing import watcher as watcher_module
from telemetry_service.processing.watcher import IngestWatcher
from tests.support import applied_events, expire_watcher_leases
from tests.telemetry.conftest import Telemetry, cli_event
from tests.telemetry.test_watcher_attacks import Poison, batches, counted, replica

REQUEST_SIZE = 25  # the CLI's flush


class Backlog:
    """``events`` CLI-shaped events from three users (each on devices of their own) and
    anonymous devices, posted in requests of 25 and not yet applied; some are poison (fail
    every attempt) and some flaky (fail their first two)."""

    def __init__(self, telemetry: Telemetry, seed: int, events: int = 1000) -> None:
        self.telemetry = telemetry
        self.events = events
        self.random = random.Random(seed)
        self.expected: Counter[str] = Counter()  # username -> innocent events
        self.poison: set[str] = set()
        self.flaky: set[str] = set()

    async def post(self, *, poison: int, flaky: int) -> None:
        users = []
        for n in range(3):
            username = f"big-{n}-{uuid.uuid4().hex[:6]}"
            _, key = await self.telemetry.register(username)
            users.append((username, key))
        requests: list[tuple[str | None, str | None, list[dict[str, Any]]]] = []
        for n in range(self.events // REQUEST_SIZE):
            who = self.random.randrange(len(users) + 1)  # the last is anonymous
            username, key = users[who] if who < len(users) else (None, None)
            device = f"big-dev-{who}-{n % 4}"
            events = [cli_event(device) for _ in range(REQUEST_SIZE)]
            requests.append((username, key, events))
        every = [e["insert_id"] for _, _, events in requests for e in events]
        chosen = self.random.sample(every, poison + flaky)
        self.poison, self.flaky = set(chosen[:poison]), set(chosen[poison:])
        for username, key, events in requests:
            response = await self.telemetry.post({"events": events}, key)
            assert response.status_code == 202, response.text
            if username is not None:
                self.expected[username] += sum(e["insert_id"] not in self.poison for e in events)

    def arm(self, monkeypatch: pytest.MonkeyPatch) -> None:
        poison = Poison(monkeypatch)
        poison.always = set(self.poison)
        poison.flaky = dict.fromkeys(self.flaky, 2)

    async def assert_exact(self) -> None:
        """Every innocent event counted once, every poison event set aside, stats exact."""
        db = self.telemetry.runtime.db
        innocent = self.events - len(self.poison)
        assert await applied_events(db) == innocent
        assert await counted(self.telemetry) == innocent  # I2: counted == applied
        dead = {e["_id"] for e in await db[EVENTS_ASIDE].find({"dead": True}, {"_id": 1}).to_list()}
        assert dead == self.poison  # I11: nothing innocent set aside
        for username, events in self.expected.items():
            assert (await self.telemetry.stats(username))["totalInvocations"] == events


async def settle(telemetry: Telemetry, *watchers: IngestWatcher) -> None:
    """Drain until the poison has used up its attempts (backoffs expired between passes)."""
    for _ in range(telemetry.runtime.settings.queue_max_attempts + 2):
        await expire_watcher_leases(telemetry.runtime.db)
        await asyncio.gather(*(w.drain() for w in watchers))


async def test_poison_and_flaky_events_scattered_through_a_thousand_event_batch(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole backlog is one batch; it fails, is moved aside and split until each poison
    event is alone; the flaky ones pass on a later attempt."""
    backlog = Backlog(telemetry, seed=1)
    await backlog.post(poison=5, flaky=5)
    backlog.arm(monkeypatch)
    watcher = replica(telemetry, ingest_max_batch_size=5000)
    await settle(telemetry, watcher)
    await backlog.assert_exact()


async def test_two_replicas_with_short_leases_race_over_a_large_backlog(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases of 0.3 s, and one transaction in three held for 0.45 s: the rival replica, looking
    every 20 ms, takes the main line or the events aside over in the middle of the batch, and
    one of the two commits must fail on its progress (LeaseLost)."""
    backlog = Backlog(telemetry, seed=3, events=500)
    await backlog.post(poison=4, flaky=4)
    backlog.arm(monkeypatch)
    poisoned, calls = watcher_module.apply_events, 0

    async def sometimes_slow(db: Any, events: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            await asyncio.sleep(0.45)
        return await poisoned(db, events, **kwargs)

    monkeypatch.setattr(watcher_module, "apply_events", sometimes_slow)
    short = {"ingest_max_batch_size": 5000, "ingest_batch_size": 50, "ingest_lease_seconds": 0.3}
    rivals = [replica(telemetry, **short) for _ in range(2)]
    lost_before = batches("lease_lost")

    async def keep_looking(watcher: IngestWatcher) -> None:
        for _ in range(15):
            await watcher.process_one_batch()
            if batches("lease_lost") > lost_before:
                return
            await asyncio.sleep(0.02)

    await asyncio.gather(*(keep_looking(r) for r in rivals))
    assert batches("lease_lost") > lost_before, "no batch was taken over: the attack missed"
    monkeypatch.setattr(watcher_module, "apply_events", poisoned)  # the rest at full speed
    await settle(telemetry, *rivals)
    await backlog.assert_exact()


async def test_a_worker_killed_twice_inside_a_thousand_event_batch_with_poison(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main line's worker is killed twice inside the batch (the third attempt moves it
    aside, charged with those deaths); then the poison in it must still be isolated, with the
    attempts left to it, and nothing counted twice."""
    backlog = Backlog(telemetry, seed=4)
    await backlog.post(poison=3, flaky=2)
    # After the device counters are written: the deaths must leave no partial count behind.
    failpoints.arm(watcher_module.AFTER_METRICS_WRITE, times=2)
    try:
        for _ in range(2):
            with pytest.raises(failpoints.FailpointError):
                await replica(telemetry, ingest_max_batch_size=5000).process_one_batch()
            await expire_watcher_leases(telemetry.runtime.db)
    finally:
        failpoints.disarm()
    backlog.arm(monkeypatch)
    await settle(telemetry, replica(telemetry, ingest_max_batch_size=5000))
    await backlog.assert_exact()
