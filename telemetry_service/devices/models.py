"""The stored shape of a device document (``user_metrics``), for every read path.

The counters a bucket sums are defined once, here, as the model's integer fields: the bucket
update, the fold, the stats API and verify all take them from ``SUMMED``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Bucket(BaseModel):
    """What one device counted for one owner of events (a user, or its anonymous events)."""

    model_config = ConfigDict(extra="ignore")

    invocations: int = 0
    successCount: int = 0
    failureCount: int = 0
    userErrorCount: int = 0
    durationMsTotal: int = 0
    agentInvocations: int = 0
    workflowSteps: int = 0
    commandCounts: dict[str, int] = Field(default_factory=dict)
    activeDays: list[str] = Field(default_factory=list)
    firstSeenAt: datetime | None = None
    lastSeenAt: datetime | None = None


#: The summed counters of a bucket, in declaration order.
SUMMED: tuple[str, ...] = tuple(
    name for name, field in Bucket.model_fields.items() if field.annotation is int
)


class Device(BaseModel):
    """A device (the CLI's ``distinct_id``) and its buckets."""

    distinctId: str
    ownerUserId: str | None = Field(
        description="The first user whose authenticated event reached the server (I3)."
    )
    anonymous: Bucket = Field(description="Events sent without an API key.")
    users: dict[str, Bucket] = Field(description="Authenticated events, per userId.")

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Device:
        return cls(
            distinctId=document["_id"],
            ownerUserId=document.get("ownerUserId"),
            anonymous=Bucket.model_validate(document.get("anon", {})),
            users={u: Bucket.model_validate(b) for u, b in document.get("users", {}).items()},
        )
