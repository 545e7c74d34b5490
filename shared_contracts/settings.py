"""Settings every swamp-club process shares: where MongoDB is and how the queues behave.

Each service extends :class:`BusSettings` with its own database and port, so neither service's
settings name the other's database.
"""

from typing import Any, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared_contracts.queue.config import QueueConfig


class SettingsError(Exception):
    """Invalid configuration; the message is one line naming the environment variable."""


class BusSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    mongodb_uri: str = Field(
        default="mongodb://127.0.0.1:27017/",
        alias="MONGODB_URI",
        pattern=r"^mongodb(\+srv)?://",
        description="MongoDB deployment holding all three databases (a replica set).",
    )
    # How long the workers wait for a server (the driver's 30 s: shorter fails transactions
    # midway on a busy or failing-over server, and a transaction whose abort cannot reach the
    # server stays open there for a minute; the crash matrix caught it at 3 s). HTTP requests
    # are bounded by REQUEST_DB_TIMEOUT_SECONDS, the operator's commands use 3 s.
    server_selection_timeout_ms: int = Field(
        default=30_000, alias="MONGODB_SERVER_SELECTION_TIMEOUT_MS", ge=100, le=120_000
    )
    # The driver's 20 s: it is also the timeout of the monitor's heartbeat, and a heartbeat that
    # times out on a busy server resets the pool under in-flight transactions, leaving them open
    # on the server (the crash matrix caught it at 3 s). A refused connection fails at once.
    connect_timeout_ms: int = Field(
        default=20_000, alias="MONGODB_CONNECT_TIMEOUT_MS", ge=100, le=120_000
    )
    # 0: none (the driver's default). A socket timeout in the middle of a transaction drops the
    # connection and leaves the transaction open on the server, holding its documents for up
    # to a minute (the crash matrix caught it); requests are bounded by their budget instead.
    socket_timeout_ms: int = Field(default=0, alias="MONGODB_SOCKET_TIMEOUT_MS", ge=0, le=600_000)
    #: Every database operation of one HTTP request, retries included, within this budget
    #: (0: no budget, only the driver's timeouts; with_transaction then retries up to 120 s).
    request_db_timeout_seconds: float = Field(
        default=10.0, alias="REQUEST_DB_TIMEOUT_SECONDS", ge=0, le=600
    )
    bus_db: str = Field(default="swamp_bus", alias="BUS_DB", min_length=1, max_length=38)
    queue_lease_seconds: float = Field(default=30.0, alias="QUEUE_LEASE_SECONDS", gt=0)
    queue_max_attempts: int = Field(default=8, alias="QUEUE_MAX_ATTEMPTS", ge=1)
    queue_backoff_base_seconds: float = Field(default=1.0, alias="QUEUE_BACKOFF_BASE_SECONDS", gt=0)
    queue_backoff_max_seconds: float = Field(default=300.0, alias="QUEUE_BACKOFF_MAX_SECONDS", gt=0)
    queue_poll_interval_seconds: float = Field(
        default=1.0, alias="QUEUE_POLL_INTERVAL_SECONDS", gt=0
    )
    queue_concurrency: int = Field(default=4, alias="QUEUE_CONCURRENCY", ge=1, le=256)
    queue_done_retention_seconds: int = Field(
        default=7 * 24 * 3600, alias="QUEUE_DONE_RETENTION_SECONDS", ge=60
    )
    queue_change_streams: bool = Field(default=True, alias="QUEUE_CHANGE_STREAMS")
    admin_token: SecretStr | None = Field(
        default=None,
        alias="ADMIN_TOKEN",
        description="Bearer token of the /admin endpoints; unset or empty turns them off.",
    )

    @field_validator("admin_token", mode="before")
    @classmethod
    def _refuse_placeholder_token(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # compose passes ${ADMIN_TOKEN:-}: empty means "no admin API"
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        refuse_placeholder_secret(text)
        return value

    def client_options(self) -> dict[str, Any]:
        """The driver's timeouts, for make_client."""
        return {
            "serverSelectionTimeoutMS": self.server_selection_timeout_ms,
            "connectTimeoutMS": self.connect_timeout_ms,
            "socketTimeoutMS": self.socket_timeout_ms or None,
        }

    def queue_config(self, **overrides: Any) -> QueueConfig:
        """The queue engine's knobs, taken from these settings."""
        values: dict[str, Any] = {
            "lease_seconds": self.queue_lease_seconds,
            "max_attempts": self.queue_max_attempts,
            "backoff_base_seconds": self.queue_backoff_base_seconds,
            "backoff_max_seconds": self.queue_backoff_max_seconds,
            "poll_interval_seconds": self.queue_poll_interval_seconds,
            "concurrency": self.queue_concurrency,
            "use_change_streams": self.queue_change_streams,
            "done_retention_seconds": self.queue_done_retention_seconds,
        }
        values.update(overrides)
        return QueueConfig(**values)


#: Words that mark a secret copied from an example instead of generated.
PLACEHOLDER_WORDS = ("changethis", "changeme", "placeholder", "example", "secret", "password")
MIN_SECRET_LENGTH = 32


def refuse_placeholder_secret(text: str) -> None:
    """A secret must be long and look generated: an admin token that an attacker can guess
    from our docs or the template we learnt from is worse than none."""
    hint = "generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters; {hint}")
    lowered = text.lower()
    if any(word in lowered for word in PLACEHOLDER_WORDS) or len(set(text)) < 8:
        raise ValueError(f"looks like a placeholder, not a generated secret; {hint}")


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment, turning a validation error into one clear line."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        info = cls.model_fields.get(field)
        name = (info.alias if info is not None and info.alias else field).upper()
        raise SettingsError(f"invalid setting {name}: {first['msg']}") from None
