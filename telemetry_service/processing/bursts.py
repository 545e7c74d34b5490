"""Bursts: a user whose events arrive faster than anyone types commands (a script, a CI fleet,
a replayed spool) gets one score refresh for a stretch of the burst, not one per batch.

Each watcher batch publishes one refresh per user it changed, and the app applies each as soon
as it can: a 10,000-event burst for one user came to 36 batches and 36 score applications in 9
seconds (bench/RESULTS.md), each a new scoreHistory entry. A burst user's refresh is therefore
published not claimable before ``SCORE_REFRESH_BURST_DELAY_SECONDS``; the batches that follow
coalesce into it (one pending refresh per user), and the app applies the newest snapshot once.
Everyone else's refreshes go at once, so the delay is paid only by the user whose own traffic
is the burst.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime

from telemetry_service.devices.store import AttributedEvent

#: A burst is judged over at least this much receipt time: a batch of a few requests that
#: arrived within a few milliseconds is no rate to go by, only its count is.
SHORTEST_SPAN_SECONDS = 1.0


def bursting_users(
    events: Iterable[AttributedEvent],
    *,
    owners: Mapping[str, str],
    events_per_second: float,
) -> set[str]:
    """The users whose events in this batch arrived at ``events_per_second`` or faster: at
    least that many times the span of their receipt times, a second at the least. An event
    counts for the user who sent it, an anonymous one for its device's owner (``owners``), as
    the fold counts them. ``events_per_second`` 0: nobody (the delay is off)."""
    if events_per_second <= 0:
        return set()
    received: dict[str, list[datetime]] = defaultdict(list)
    for event in events:
        user = event.user_id or owners.get(event.device)
        if user:
            received[user].append(event.received_at)
    return {
        user
        for user, times in received.items()
        if len(times)
        >= events_per_second * max(SHORTEST_SPAN_SECONDS, (max(times) - min(times)).total_seconds())
    }
