"""Response models of GET /v1/stats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class UsernameStats(BaseModel):
    """A username's projection: its own events on all its devices plus the anonymous events of
    the devices it owns."""

    username: str
    userId: str
    totalInvocations: int = Field(description="Distinct events attributed to the user.")
    successCount: int = Field(description="Events with result.status == success.")
    failureCount: int = Field(description="Events with result.status error or user_error.")
    userErrorCount: int
    durationMsTotal: int
    agentInvocations: int = Field(description="Events run inside an AI agent session.")
    workflowSteps: int = Field(description="Events that were steps of a workflow run.")
    activeDays: int = Field(description="Distinct UTC days with at least one event.")
    firstSeenAt: datetime | None
    lastSeenAt: datetime | None
    commandCounts: dict[str, int]
    distinctIds: list[str]
    projectionVersion: int
    updatedAt: datetime

    @classmethod
    def from_projection(cls, document: dict[str, Any]) -> UsernameStats:
        return cls.model_validate({**document, "username": document["_id"]})


class Bucket(BaseModel):
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


class DeviceStats(BaseModel):
    distinctId: str
    ownerUserId: str | None
    anonymous: Bucket = Field(description="Events sent without an API key.")
    users: dict[str, Bucket] = Field(description="Authenticated events, per userId.")

    @classmethod
    def from_device(cls, document: dict[str, Any]) -> DeviceStats:
        return cls(
            distinctId=document["_id"],
            ownerUserId=document.get("ownerUserId"),
            anonymous=Bucket.model_validate(document.get("anon", {})),
            users={u: Bucket.model_validate(b) for u, b in document.get("users", {}).items()},
        )
