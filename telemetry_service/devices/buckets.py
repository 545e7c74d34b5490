"""Per-device counters (SPEC section 6): what a batch of events adds to one bucket.

A device document holds one bucket for its anonymous events (``anon``) and one per user who
authenticated on it (``users.<userId>``: keyed by id, so renames never touch it), plus
``ownerUserId`` (I3) and ``userIds`` (an index of the users that have a bucket).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from telemetry_service import counters
from telemetry_service.devices import cli_commands
from telemetry_service.devices.models import SUMMED
from telemetry_service.ingest.schemas import CliEvent

ANONYMOUS = "anon"


def event_counts(event: CliEvent) -> dict[str, int]:
    """What one event adds to each summed counter of its bucket (``models.SUMMED``)."""
    properties = event.properties
    status = properties.result.status
    context = properties.invocationContext
    counts = {
        "invocations": True,
        "successCount": status == "success",
        "failureCount": status != "success",
        "userErrorCount": status == "user_error",
        "durationMsTotal": properties.durationMs or 0,
        "agentInvocations": bool(context and context.agentSessionDetected),
        "workflowSteps": properties.workflowContext is not None,
    }
    # Integers, never booleans: $inc refuses to add true.
    return {name: int(value) for name, value in counts.items()}


@dataclass
class BucketDelta:
    """What one batch adds to one bucket. The counters are the model's (``SUMMED``), kept in
    one mapping so that the list is written down once."""

    sums: Counter[str] = field(default_factory=Counter)
    commandCounts: Counter[str] = field(default_factory=Counter)
    activeDays: set[str] = field(default_factory=set)
    firstSeenAt: datetime | None = None
    lastSeenAt: datetime | None = None

    def __getattr__(self, name: str) -> int:
        # delta.durationMsTotal and the like read the summed counter of that name.
        if name in SUMMED:
            return self.sums[name]
        raise AttributeError(name)

    def add(self, event: CliEvent, seen_at: datetime) -> None:
        self.sums.update(event_counts(event))
        self.commandCounts[command_key(event)] += 1
        self.activeDays.add(utc_day(seen_at))
        self.firstSeenAt = min(filter(None, (self.firstSeenAt, seen_at)))
        self.lastSeenAt = max(filter(None, (self.lastSeenAt, seen_at)))

    def update_operators(self, path: str) -> dict[str, dict[str, Any]]:
        inc = {f"{path}.{name}": self.sums[name] for name in SUMMED if self.sums[name]}
        inc |= {f"{path}.commandCounts.{c}": n for c, n in self.commandCounts.items()}
        return {
            "$inc": inc,
            "$min": {f"{path}.firstSeenAt": self.firstSeenAt},
            "$max": {f"{path}.lastSeenAt": self.lastSeenAt},
            "$addToSet": {f"{path}.activeDays": {"$each": sorted(self.activeDays)}},
        }


def command_key(event: CliEvent) -> str:
    """The key an event counts under in ``commandCounts``: ``command subcommand`` only when both
    are in the CLI's command tree (``cli_commands.py``), an unknown subcommand under its command
    alone, an unknown command under ``other``. Every key is a word of the tree, so it is a safe
    field name and a user's values never become public counters. Unknown words are counted on
    /metrics (by position and known command, never by the word) so a newer CLI gets noticed."""
    invocation = event.properties.invocation
    key, unknown = cli_commands.classify(invocation.command, invocation.subcommand)
    if unknown is not None:
        command = key if unknown == "subcommand" else cli_commands.OTHER
        counters.UNKNOWN_COMMAND_WORDS.labels(position=unknown, command=command).inc()
    return key


#: The client's clock is trusted only this far from the server's (SPEC I12): the CLI re-sends
#: for up to 7 days (a day more for time zones and the last flush), and a few minutes of clock
#: skew ahead are normal. Anything else is a wrong clock or an invented date.
TRUSTED_PAST = timedelta(days=8)
TRUSTED_FUTURE = timedelta(minutes=5)


def seen_at(event: CliEvent, received_at: datetime) -> datetime:
    """When the event happened, in UTC, by the server's clock: the client's ``startedAt`` only
    within ``[received_at - 8 days, received_at + 5 minutes]``, else ``received_at``.

    Total for any event: a ``startedAt`` that has no UTC value (its offset pushes it past
    years 1-9999) counts as out of the window. A naive ``received_at`` is taken as UTC."""
    received = as_utc(received_at)
    started = event.properties.startedAt
    if started is None:
        return received
    try:
        started = as_utc(started)
    except OverflowError:
        return received
    if received - TRUSTED_PAST <= started <= received + TRUSTED_FUTURE:
        return started
    return received


def as_utc(moment: datetime) -> datetime:
    """The same instant in UTC (naive means UTC). OverflowError if it has no UTC value."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def utc_day(moment: datetime) -> str:
    """The UTC day of an instant, ``YYYY-MM-DD``: 2026-03-01T23:30-05:00 is 2026-03-02."""
    return as_utc(moment).date().isoformat()


def bucket_path(user_id: str | None) -> str:
    return f"users.{user_id}" if user_id else ANONYMOUS


def merge_operators(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for operator, fields in part.items():
            merged.setdefault(operator, {}).update(fields)
    return {operator: fields for operator, fields in merged.items() if fields}
