"""The fold (SPEC section 6): a user's projection from its devices' buckets. Pure Python.

The user's own bucket on every device it has used, plus the anonymous bucket of every device it
owns (I3). Sums, min/max and set unions only, so the order of devices never matters. It is also
what ``telemetry verify`` recomputes to check I4.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from telemetry_service.devices.buckets import ANONYMOUS
from telemetry_service.devices.models import SUMMED

#: The fields of a projection that the fold computes (the rest is bookkeeping).
FOLDED_FIELDS = (
    "totalInvocations",
    *(name for name in SUMMED if name != "invocations"),
    "commandCounts",
    "activeDays",
    "activeDayList",
    "firstSeenAt",
    "lastSeenAt",
    "distinctIds",
)


def buckets_of(user_id: str, device: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    own = device.get("users", {}).get(user_id)
    anonymous = device.get(ANONYMOUS) if device.get("ownerUserId") == user_id else None
    return [bucket for bucket in (own, anonymous) if bucket]


def fold(
    user_id: str, devices: Iterable[Mapping[str, Any]], distinct_ids: Iterable[str]
) -> dict[str, Any]:
    sums = dict.fromkeys(SUMMED, 0)
    commands: dict[str, int] = {}
    days: set[str] = set()
    first: datetime | None = None
    last: datetime | None = None
    for device in devices:
        for bucket in buckets_of(user_id, device):
            for name in SUMMED:
                sums[name] += int(bucket.get(name, 0))
            for command, count in bucket.get("commandCounts", {}).items():
                commands[command] = commands.get(command, 0) + int(count)
            days.update(bucket.get("activeDays", []))
            first = min(filter(None, (first, bucket.get("firstSeenAt"))), default=None)
            last = max(filter(None, (last, bucket.get("lastSeenAt"))), default=None)
    total = sums.pop("invocations")
    return {
        "totalInvocations": total,
        **sums,
        "commandCounts": dict(sorted(commands.items())),
        "activeDays": len(days),
        "activeDayList": sorted(days),
        "firstSeenAt": first,
        "lastSeenAt": last,
        "distinctIds": sorted(set(distinct_ids)),
    }


def folded_part(projection: Mapping[str, Any]) -> dict[str, Any]:
    return {name: projection.get(name) for name in FOLDED_FIELDS}
