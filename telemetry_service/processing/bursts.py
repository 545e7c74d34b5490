"""Bursts: a user whose events arrive faster than anyone types commands (a script, a CI fleet,
a replayed spool) gets one score refresh for a stretch of the burst, not one per batch.

Each watcher batch publishes one refresh per user it changed, and the app applies each as soon
as it can: a 10,000-event burst for one user came to 36 batches and 36 score applications in 9
seconds (bench/RESULTS.md), each a new scoreHistory entry. A burst user's refresh is therefore
published not claimable before ``SCORE_REFRESH_BURST_DELAY_SECONDS``; the batches that follow
coalesce into it (one pending refresh per user), and the app applies the newest snapshot once.
Everyone else's refreshes go at once, so the delay is paid only by the user whose own traffic
is the burst.

A burst is judged over the last ``WINDOW_SECONDS`` of a user's events by receipt time, across
batches, not within one batch: a batch covers a fraction of a second, in which an ordinary
user's requests of 25 events can bunch up to several times their rate (the bench's users, at
40 events a second, reached 100 within one batch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from telemetry_service.devices.store import AttributedEvent

#: How much receipt time a burst is judged over.
WINDOW_SECONDS = 2.0


class BurstWatch:
    """The receipt times of each user's events applied lately (the last ``WINDOW_SECONDS``),
    kept by the watcher between its batches. In memory: a replica that takes the main line over
    starts with an empty window and, for its first seconds, delays less, never more."""

    def __init__(self, *, events_per_second: float, window_seconds: float = WINDOW_SECONDS):
        self.threshold = events_per_second * window_seconds
        self.window = timedelta(seconds=window_seconds)
        #: userId -> batch -> receipt times. By batch, so that a batch tried again (a write
        #: conflict reruns its transaction) replaces its own times instead of adding them twice.
        self._seen: dict[str, dict[str, list[datetime]]] = defaultdict(dict)

    def bursting(self, events: Iterable[AttributedEvent], *, owners: Mapping[str, str]) -> set[str]:
        """Record a batch's events and return its users who are in a burst: at least
        ``events_per_second`` x the window of their events received within the window before
        their newest. An event counts for the user who sent it, an anonymous one for its
        device's owner (``owners``), as the fold counts them. A rate of 0: nobody."""
        if self.threshold <= 0:
            return set()
        batch: dict[str, list[AttributedEvent]] = defaultdict(list)
        for event in events:
            if user := event.user_id or owners.get(event.device):
                batch[user].append(event)
        if not batch:
            return set()
        newest = max(e.received_at for mine in batch.values() for e in mine)
        self._forget_before(newest - self.window)
        found = set()
        for user, mine in batch.items():
            self._seen[user][min(e.id for e in mine)] = [e.received_at for e in mine]
            times = [t for batch_times in self._seen[user].values() for t in batch_times]
            since = max(times) - self.window
            if sum(1 for t in times if t >= since) >= self.threshold:
                found.add(user)
        return found

    def _forget_before(self, cutoff: datetime) -> None:
        for user in list(self._seen):
            batches = self._seen[user]
            for key in [k for k, times in batches.items() if max(times) < cutoff]:
                del batches[key]
            if not batches:
                del self._seen[user]
