"""The messages on the two queues (SPEC section 3), as pydantic models.

A message is its payload only; the queue engine adds its own fields (status, attempts, ...) to the
stored document. Every model knows its queue, and may name a ``dedupe_key`` (coalescing: at most
one pending message per key) and an ``ordering_key`` (handled one at a time in publish order).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from shared_contracts.names import SWAMP_CLUB_EVENTS, TELEMETRY_COMMANDS

#: Usernames as the app enforces them; repeated here so every consumer validates what enters it.
#: pydantic's default (Rust) engine reads ``$`` as the end of the text, as JSON Schema does; the
#: full match below keeps it so under Python's ``re`` too, where ``$`` also matches before a
#: final newline ("zed\n") and which pydantic switches to for lookarounds.
USERNAME_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"


def _whole_username(value: str) -> str:
    if re.fullmatch(USERNAME_PATTERN, value) is None:
        raise ValueError("a username is 3-39 lowercase letters, digits and single hyphens")
    return value


Username = Annotated[
    str,
    Field(min_length=3, max_length=39, pattern=USERNAME_PATTERN),
    AfterValidator(_whole_username),
]
UserId = Annotated[str, Field(min_length=1, max_length=64)]
KeyHash = Annotated[
    str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the API key, hex")
]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    QUEUE: ClassVar[str]
    #: Schema versions a consumer of this build can read.
    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})
    #: A transaction of the publisher may hold a pending one of these while it runs
    #: (Queue.hold_pending): claims of this type never wait for one (Queue.claim_many).
    HELD_BY_PUBLISHER: ClassVar[bool] = False
    #: Its dedupe key is its ordering key: a pending one is its key's only pending message, so
    #: a claim's order check need not read pending ones (Queue._claim_in_one_transaction).
    #: Only where every type on the queue says so: another type's message may share the key.
    DEDUPED_BY_ORDERING_KEY: ClassVar[bool] = False

    type: str
    schemaVersion: int = 1

    def dedupe_key(self) -> str | None:
        return None

    def ordering_key(self) -> str | None:
        return None


# --- telemetry_commands: swamp_app -> telemetry_service ------------------------------------


#: Why a name assignment carries the app's *name clock*, not a per-user counter: a freed name can
#: be taken by another user a second later, and telemetry may apply the two users' commands in
#: either order. One clock for every name assignment (registrations and renames, incremented in
#: the same transaction) orders them as the app committed them, across users, so telemetry can
#: tell which user holds a contested name without asking. It also increases per user (I6).
NameSeq = Annotated[
    int,
    Field(
        ge=0,
        description="The app's name clock at this assignment: increases with every registration "
        "and rename, across all users (and so also per user).",
    ),
]


class UsernameChanged(Message):
    """State assignment (I6): "user ``userId``'s name is ``newUsername`` as of ``seq``".

    Applying the newest ``seq`` is enough; an older one changes nothing. ``oldUsername`` is
    informational: nothing is looked up or moved by it.
    """

    QUEUE: ClassVar[str] = TELEMETRY_COMMANDS
    type: Literal["username_changed"] = "username_changed"
    schemaVersion: Literal[1] = 1
    oldUsername: Username
    newUsername: Username
    userId: UserId
    seq: NameSeq

    def ordering_key(self) -> str:
        return f"user:{self.userId}"


class UserRegistered(Message):
    """A new user, and its first name assignment (as of ``seq``, like ``username_changed``)."""

    QUEUE: ClassVar[str] = TELEMETRY_COMMANDS
    type: Literal["user_registered"] = "user_registered"
    schemaVersion: Literal[1] = 1
    userId: UserId
    username: Username
    # 0 for registrations published before the name clock existed: older than any rename.
    seq: NameSeq = 0

    def ordering_key(self) -> str:
        return f"user:{self.userId}"


class ApiKeyIssued(Message):
    QUEUE: ClassVar[str] = TELEMETRY_COMMANDS
    type: Literal["api_key_issued"] = "api_key_issued"
    schemaVersion: Literal[1] = 1
    userId: UserId
    keyHash: KeyHash

    def ordering_key(self) -> str:
        return f"user:{self.userId}"


class ApiKeyRevoked(Message):
    """Carries only the hash (SPEC); its handler must be order-independent of the issue."""

    QUEUE: ClassVar[str] = TELEMETRY_COMMANDS
    type: Literal["api_key_revoked"] = "api_key_revoked"
    schemaVersion: Literal[1] = 1
    keyHash: KeyHash


# --- swamp_club_events: telemetry_service -> swamp_app --------------------------------------

RefreshReason = Literal["ingest", "binding", "backfill", "identity_migration"]


class ScoreRefresh(Message):
    """A user's projection changed: re-score from this snapshot (applied only if newer, I9).

    Version 2 is addressed by ``userId``: version 1 named only a username, which another user
    may hold by the time it is applied. Version 1 messages are dead-lettered as unsupported; the
    upgrade republishes every user's refresh, so none is needed.
    """

    QUEUE: ClassVar[str] = SWAMP_CLUB_EVENTS
    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({2})
    #: A watcher batch holds the pending refresh of each user it may re-project.
    HELD_BY_PUBLISHER: ClassVar[bool] = True
    DEDUPED_BY_ORDERING_KEY: ClassVar[bool] = True
    type: Literal["score_refresh"] = "score_refresh"
    schemaVersion: Literal[2] = 2
    userId: UserId
    username: Username | None = Field(
        description="The user's current name as telemetry knows it (informational; None while "
        "a newer claim on the name is still on its way)."
    )
    reason: RefreshReason
    projectionVersion: int = Field(ge=1)
    snapshot: dict[str, Any] = Field(description="The username_metrics document at publish time.")

    def dedupe_key(self) -> str:
        # One pending refresh per user: a newer projection replaces the waiting snapshot.
        return score_refresh_key(self.userId)

    def ordering_key(self) -> str:
        # One active refresh per user: while it is applied, the next one waits (and keeps
        # absorbing newer snapshots) instead of being applied in parallel.
        return score_refresh_key(self.userId)


def score_refresh_key(user_id: str) -> str:
    """The dedupe and ordering key of a user's score refreshes."""
    return f"score_refresh:{user_id}"


TelemetryCommand = Annotated[
    UsernameChanged | UserRegistered | ApiKeyIssued | ApiKeyRevoked, Field(discriminator="type")
]
AnyMessage = Annotated[
    UsernameChanged | UserRegistered | ApiKeyIssued | ApiKeyRevoked | ScoreRefresh,
    Field(discriminator="type"),
]

MESSAGE_TYPES: dict[str, type[Message]] = {
    model.model_fields["type"].default: model
    for model in (UsernameChanged, UserRegistered, ApiKeyIssued, ApiKeyRevoked, ScoreRefresh)
}
ANY_MESSAGE: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


def types_for_queue(queue: str) -> dict[str, type[Message]]:
    return {name: model for name, model in MESSAGE_TYPES.items() if queue == model.QUEUE}


def json_schemas() -> dict[str, Any]:
    """The contract for other teams: the JSON Schema of every message, by queue and type."""
    return {
        queue: {name: model.model_json_schema() for name, model in types_for_queue(queue).items()}
        for queue in (TELEMETRY_COMMANDS, SWAMP_CLUB_EVENTS)
    }
