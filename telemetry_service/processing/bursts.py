"""Bursts: a user whose events arrive faster than anyone types commands (a script, a CI fleet,
a replayed spool) gets one score refresh for a stretch of the burst, not one per batch.

Each watcher batch publishes one refresh per user it changed, and the app applies each as soon
as it can: a 10,000-event burst for one user came to 36 batches and 36 score applications in 9
seconds (bench/RESULTS.md at 63eb7bd), each a new scoreHistory entry. A burst user's refresh
is therefore published not claimable before ``SCORE_REFRESH_BURST_DELAY_SECONDS``; the batches
that follow coalesce into it (one pending refresh per user), and the app applies the newest
snapshot once.
Everyone else's refreshes go at once, so the delay is paid only by the user whose own traffic
is the burst.

A burst is judged over the last ``WINDOW_SECONDS`` of a user's events by receipt time, across
batches, not within one batch: a batch covers a fraction of a second, in which an ordinary
user's requests of 25 events can bunch up to several times their rate (the bench's users, at
40 events a second, reached 100 within one batch). The rate is the user's events over the
time they actually span in that window, but never less than ``SHORTEST_SPAN_SECONDS``: with
the window's whole length as the divisor, a burst was no burst until 400 of its events had
arrived, and its first three batches were each applied at once (bench/RESULTS.md at b2cb265:
7 applications, 3 of them those); one second of requests bunched together is still no burst.
The events counted are those that arrived before the newest moment, which ends the span, as a
rate over arrivals counts the gaps between them; the newest moment alone is judged as a
second's worth of events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from telemetry_service.devices.store import AttributedEvent

#: How much receipt time a burst is judged over.
WINDOW_SECONDS = 2.0
#: The shortest stretch a rate is judged over: at 200 events a second, 200 events (eight of the
#: CLI's requests) within a second, from a user quiet before, are a burst; fewer are not.
SHORTEST_SPAN_SECONDS = 1.0


class BurstWatch:
    """The receipt times of each user's events seen lately (the last ``WINDOW_SECONDS`` before
    the user's newest), kept by the watcher between its batches. In memory: a replica that takes
    the main line over starts with an empty window and, for its first seconds, delays less,
    never more."""

    def __init__(self, *, events_per_second: float, window_seconds: float = WINDOW_SECONDS):
        self.events_per_second = events_per_second
        self.window = timedelta(seconds=window_seconds)
        #: userId -> event id -> receipt time. By event id: a batch's transaction that runs
        #: again (a write conflict), or is cut in halves around a failing event, sees its events
        #: again, and each must count once (counted per attempt, one bad event in a batch made
        #: its calm neighbours a burst: tests/telemetry/test_bursts.py).
        self._seen: dict[str, dict[str, datetime]] = {}

    def bursting(self, events: Iterable[AttributedEvent], *, owners: Mapping[str, str]) -> set[str]:
        """Record a batch's events and return its users who are in a burst: their events
        received within the window before their newest moment came at ``events_per_second`` or
        faster over the time up to it (at least ``SHORTEST_SPAN_SECONDS``). An event counts for the
        user who sent it, an anonymous one for its device's owner (``owners``), as the fold
        counts them. A rate of 0: nobody."""
        if self.events_per_second <= 0:
            return set()
        batch: dict[str, dict[str, datetime]] = defaultdict(dict)
        for event in events:
            if user := event.user_id or owners.get(event.device):
                batch[user][event.id] = event.received_at
        if not batch:
            return set()
        found = set()
        for user, mine in batch.items():
            seen = self._seen.setdefault(user, {})
            seen.update(mine)
            # Each user's window ends at their own newest event: one event stamped ahead (an
            # ingest replica's clock) moves no one else's.
            newest = max(seen.values())
            self._seen[user] = seen = {i: t for i, t in seen.items() if t >= newest - self.window}
            span = (newest - min(seen.values())).total_seconds()
            # The events of the newest moment close the span; they did not arrive within it.
            # Counted in, bunches half the rate apart were a burst: 125 events every 1.25 s
            # came to 250 over 1.25 s (tests/telemetry/test_bursts_bunched.py). A moment that
            # alone holds a second's worth is one, as any second's worth is.
            within = sum(1 for received in seen.values() if received < newest)
            rate = self.events_per_second
            if (
                within >= rate * max(span, SHORTEST_SPAN_SECONDS)
                or len(seen) - within >= rate * SHORTEST_SPAN_SECONDS
            ):
                found.add(user)
        self._forget_quiet(
            min(datetime.now(UTC), max(t for mine in batch.values() for t in mine.values()))
        )
        return found

    def _forget_quiet(self, now: datetime) -> None:
        """Users with nothing received in the window before ``now`` (the batch's newest event,
        never past the clock): memory stays bounded by the users active in the last window."""
        cutoff = now - self.window
        for user in [u for u, seen in self._seen.items() if max(seen.values()) < cutoff]:
            del self._seen[user]
