"""Per-device counters (SPEC section 6): what a batch of events adds to one bucket.

A device document holds one bucket for its anonymous events (``anon``) and one per user who
authenticated on it (``users.<userId>``: keyed by id, so renames never touch it), plus
``ownerUserId`` (I3) and ``userIds`` (an index of the users that have a bucket).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from telemetry_service.devices.models import SUMMED
from telemetry_service.ingest.schemas import CliEvent

ANONYMOUS = "anon"


@dataclass
class BucketDelta:
    """What one batch adds to one bucket."""

    invocations: int = 0
    successCount: int = 0
    failureCount: int = 0
    userErrorCount: int = 0
    durationMsTotal: int = 0
    agentInvocations: int = 0
    workflowSteps: int = 0
    commandCounts: Counter[str] = field(default_factory=Counter)
    activeDays: set[str] = field(default_factory=set)
    firstSeenAt: datetime | None = None
    lastSeenAt: datetime | None = None

    def add(self, event: CliEvent, seen_at: datetime) -> None:
        properties = event.properties
        self.invocations += 1
        status = properties.result.status
        self.successCount += status == "success"
        self.failureCount += status != "success"
        self.userErrorCount += status == "user_error"
        self.durationMsTotal += properties.durationMs or 0
        context = properties.invocationContext
        self.agentInvocations += bool(context and context.agentSessionDetected)
        self.workflowSteps += properties.workflowContext is not None
        self.commandCounts[command_key(event)] += 1
        self.activeDays.add(seen_at.date().isoformat())
        self.firstSeenAt = min(filter(None, (self.firstSeenAt, seen_at)))
        self.lastSeenAt = max(filter(None, (self.lastSeenAt, seen_at)))

    def update_operators(self, path: str) -> dict[str, dict[str, Any]]:
        inc = {f"{path}.{name}": getattr(self, name) for name in SUMMED if getattr(self, name)}
        inc |= {f"{path}.commandCounts.{c}": n for c, n in self.commandCounts.items()}
        return {
            "$inc": inc,
            "$min": {f"{path}.firstSeenAt": self.firstSeenAt},
            "$max": {f"{path}.lastSeenAt": self.lastSeenAt},
            "$addToSet": {f"{path}.activeDays": {"$each": sorted(self.activeDays)}},
        }


_UNSAFE = re.compile(r"[.$\x00]")


def command_key(event: CliEvent) -> str:
    """`command subcommand`, usable as a field name ('.' and '$' would be paths/operators)."""
    invocation = event.properties.invocation
    key = " ".join(filter(None, (invocation.command, invocation.subcommand))) or "(none)"
    return _UNSAFE.sub("_", key)[:100]


def seen_at(event: CliEvent, received_at: datetime) -> datetime:
    return event.properties.startedAt or received_at


def bucket_path(user_id: str | None) -> str:
    return f"users.{user_id}" if user_id else ANONYMOUS


def merge_operators(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for operator, fields in part.items():
            merged.setdefault(operator, {}).update(fields)
    return {operator: fields for operator, fields in merged.items() if fields}
