"""CLI-shaped traffic: who owns which device, and the requests the CLI would send.

- every device is owned by one user (its first authenticated event, sent in a warm-up before
  the measured traffic), and a few devices are shared: a second user also authenticates there;
- a request is one device's spool flush: up to 25 events (most full, some shorter), with the
  owner's key, a sharing user's key, or no key at all (builds before late February 2026 and
  logged-out CLIs send none);
- senders: 8 concurrent, unpaced or paced to a steady overall rate.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.common import REQUEST_SIZE
from shared_contracts.keys import api_key_hash

#: Share of requests sent without a key (the rest carry the owner's, or on a shared device
#: sometimes the sharing user's).
ANONYMOUS_SHARE = 0.3
#: Share of requests on a shared device authenticated by its second user.
SHARED_DEVICE_OTHER_USER = 0.5
#: One device in this many is shared by a second user.
SHARED_EVERY = 40
SENDERS = 8


def event(device: str, n: int) -> dict[str, Any]:
    event_id = str(uuid.uuid4())
    return {
        "event": "cli_invocation",
        "distinct_id": device,
        "insert_id": event_id,
        "properties": {
            "id": event_id,
            "invocation": {
                "command": ["model", "run", "init", "workflow"][n % 4],
                "args": [],
                "optionKeys": [],
            },
            "result": {"status": "success" if n % 4 else "error", "exitCode": 0 if n % 4 else 1},
            "startedAt": f"2026-09-{1 + n % 28:02d}T08:01:02.003Z",
            "durationMs": 100 + n % 50,
            "platform": "linux",
        },
    }


@dataclass(frozen=True)
class Request:
    device: str
    key: str | None
    events: list[dict[str, Any]]

    @property
    def body(self) -> dict[str, Any]:
        # The CLI sends one event as the bare object, two or more wrapped.
        return self.events[0] if len(self.events) == 1 else {"events": self.events}

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key} if self.key else {}


@dataclass(frozen=True)
class Population:
    """Users (userId, API key) and their devices; ``owner`` and ``sharer`` by device."""

    keys: dict[str, str]  # userId -> key
    owner: dict[str, str]  # device -> userId
    sharer: dict[str, str]  # shared device -> its second user

    @classmethod
    def build(cls, keys: dict[str, str], devices_per_user: int, tag: str) -> Population:
        users = sorted(keys)
        owner = {
            f"dev-{tag}-{u}-{d}": user
            for u, user in enumerate(users)
            for d in range(devices_per_user)
        }
        sharer = {}
        if len(users) > 1:
            for i, device in enumerate(sorted(owner)):
                if i % SHARED_EVERY == 0:
                    sharer[device] = users[(users.index(owner[device]) + 1) % len(users)]
        return cls(keys=keys, owner=owner, sharer=sharer)

    def user_of_key_hash(self) -> dict[str, str]:
        return {api_key_hash(key): user for user, key in self.keys.items()}

    def warm_up(self) -> list[Request]:
        """One authenticated event per device by its owner: ownership is settled before the
        measured traffic, as for devices in use for a while."""
        return [
            Request(d, self.keys[u], [event(d, n)]) for n, (d, u) in enumerate(self.owner.items())
        ]

    def requests(self, events: int, *, seed: int = 17) -> list[Request]:
        rng = random.Random(seed)
        devices = sorted(self.owner)
        requests: list[Request] = []
        sent = 0
        while sent < events:
            device = rng.choice(devices)
            size = REQUEST_SIZE if rng.random() < 0.7 else rng.randint(1, REQUEST_SIZE - 1)
            size = min(size, events - sent)
            key: str | None = None
            if device in self.sharer and rng.random() < SHARED_DEVICE_OTHER_USER:
                key = self.keys[self.sharer[device]]
            elif rng.random() >= ANONYMOUS_SHARE:
                key = self.keys[self.owner[device]]
            requests.append(Request(device, key, [event(device, sent + i) for i in range(size)]))
            sent += size
        return requests

    def mix(self, requests: list[Request]) -> str:
        events = sum(len(r.events) for r in requests)
        anonymous = sum(len(r.events) for r in requests if r.key is None)
        shared = sum(
            len(r.events)
            for r in requests
            if r.key is not None and r.key != self.keys[self.owner[r.device]]
        )
        return (
            f"{len(requests)} requests of {events / len(requests):.1f} events on average, "
            f"{anonymous / events:.0%} of events anonymous, {shared / events:.1%} by a device's "
            f"second user; {len(self.keys)} users, {len(self.owner)} devices, "
            f"{len(self.sharer)} shared"
        )


async def send(
    post: Callable[[Request], Awaitable[None]],
    requests: list[Request],
    *,
    rate: float | None,
    senders: int = SENDERS,
) -> float:
    """Send with ``senders`` concurrent senders, as fast as they go (``rate`` None) or paced: the
    request that starts with the n-th event is due at n / rate seconds. Returns the seconds from
    the first send to the last answer."""
    due, sent = [], 0
    for request in requests:
        due.append(sent / rate if rate else 0.0)
        sent += len(request.events)
    queue = iter(range(len(requests)))
    started = time.monotonic()

    async def sender() -> None:
        for index in queue:
            delay = started + due[index] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await post(requests[index])

    await asyncio.gather(*(sender() for _ in range(senders)))
    return time.monotonic() - started
