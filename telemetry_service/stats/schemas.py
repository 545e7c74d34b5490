"""Response models of GET /v1/stats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class UsernameStats(BaseModel):
    """A user's projection, found by the name it holds now: its own events on all its devices
    plus the anonymous events of the devices it owns."""

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
    projectionVersion: int
    updatedAt: datetime

    @classmethod
    def from_projection(cls, document: dict[str, Any]) -> UsernameStats:
        return cls.model_validate({**document, "userId": document["_id"]})


class OwnUsernameStats(UsernameStats):
    """The same, for the user itself (its API key) or an operator: with its device ids."""

    distinctIds: list[str]
