"""What the swamp CLI sends (../shared/cli-events.md). We validate what we use and keep the rest:
newer CLIs add fields, and the raw event is stored as received."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator


class Invocation(BaseModel):
    model_config = ConfigDict(extra="allow")
    command: str = Field(max_length=200)
    subcommand: str | None = Field(default=None, max_length=200)
    args: list[str] = Field(default_factory=list, max_length=1000)
    optionKeys: list[str] = Field(default_factory=list, max_length=1000)
    globalOptions: list[str] = Field(default_factory=list, max_length=1000)


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["success", "error", "user_error"]
    exitCode: int | None = None


class InvocationContext(BaseModel):
    model_config = ConfigDict(extra="allow")
    agentSessionDetected: bool | None = None


class EventProperties(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = Field(default=None, min_length=1, max_length=200)
    invocation: Invocation
    result: Result
    startedAt: AwareDatetime | None = None
    completedAt: AwareDatetime | None = None
    durationMs: int | None = Field(default=None, ge=0)
    invocationContext: InvocationContext | None = None
    workflowContext: dict[str, Any] | None = None


class CliEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    event: str = Field(min_length=1, max_length=200)
    distinct_id: str = Field(min_length=1, max_length=200)
    insert_id: str | None = Field(default=None, min_length=1, max_length=200)
    properties: EventProperties

    @model_validator(mode="after")
    def has_an_event_id(self) -> CliEvent:
        if self.insert_id is None and self.properties.id is None:
            raise ValueError("an event id is required: insert_id, or properties.id")
        return self

    @property
    def event_id(self) -> str:
        # insert_id is the dedup key; builds before August 2026 only send properties.id.
        event_id = self.insert_id or self.properties.id
        assert event_id is not None
        return event_id


class IngestAccepted(BaseModel):
    accepted: int = Field(description="Events stored now.")
    duplicates: int = Field(description="Events already stored (a re-send): counted once, ever.")
