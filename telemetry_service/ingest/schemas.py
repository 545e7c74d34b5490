"""What the swamp CLI sends (../shared/cli-events.md). We validate what we use and keep the rest:
newer CLIs add fields, and the raw event is stored as received."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    model_validator,
)

#: The longest duration one event adds to a sum: 7 days. A longer ``durationMs`` (a ``swamp
#: serve`` that ran for weeks, or a hostile 2^63-1) is accepted and counted as 7 days, so no sum
#: can overflow int64: it would take 2^63 / 604,800,000 = 1.5e10 events of one user.
MAX_DURATION_MS = 7 * 24 * 60 * 60 * 1000


def _clamp_duration(value: int | None) -> int | None:
    return None if value is None else min(value, MAX_DURATION_MS)


def _in_utc(value: datetime) -> datetime:
    """The instant in UTC; refused if it has none (its offset moves it past years 1-9999)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is outside years 1-9999 once converted to UTC") from None


#: ISO 8601 with a UTC offset, normalised to UTC; any instant of years 1-9999 is accepted, and
#: which day it counts for is decided by the server's clock (``devices/buckets.seen_at``).
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
#: Milliseconds, >= 0; above MAX_DURATION_MS counted as MAX_DURATION_MS (the raw event keeps
#: what was sent).
DurationMs = Annotated[StrictInt, Field(ge=0), AfterValidator(_clamp_duration)]


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
    # Strict (as is agentSessionDetected and durationMs): the CLI sends real integers and
    # booleans, and lax coercion (false as 0, "5" as 5) would accept what the schema refuses.
    exitCode: StrictInt | None = None


class InvocationContext(BaseModel):
    model_config = ConfigDict(extra="allow")
    agentSessionDetected: StrictBool | None = None


class EventProperties(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = Field(default=None, min_length=1, max_length=200)
    invocation: Invocation
    result: Result
    startedAt: UtcDatetime | None = None
    completedAt: UtcDatetime | None = None
    durationMs: DurationMs | None = None
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
