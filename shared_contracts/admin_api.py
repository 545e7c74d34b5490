"""What both services' ``/admin`` endpoints share: the admin-token guard, and the operator's view
of the queue the service consumes (``swamp-club queue`` over HTTP, for operators who hold the
admin token but no database credentials).

The token is ``ADMIN_TOKEN`` (settings refuse short or placeholder values). Unset, every admin
endpoint answers 403 ``admin_disabled``: an admin API is something an operator turns on.
"""

# No `from __future__ import annotations`: the routes below use a dependency alias local to
# queue_admin_router, which FastAPI could not resolve from a string annotation.
import hashlib
import hmac
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from shared_contracts.api_errors import ApiError, Unauthorized, error_responses
from shared_contracts.queue.admin import Collection, list_dead, queue_stats, retry_dead
from shared_contracts.queue.engine import utcnow


class AdminDisabled(ApiError):
    status_code, code = 403, "admin_disabled"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def is_admin(request: Request, authorization: str | None) -> bool:
    """Whether ``Authorization: Bearer <ADMIN_TOKEN>`` was presented (False when the admin API
    is off). Compared as SHA-256 digests in constant time, so neither the token's content nor
    its length leaks through timing."""
    expected: SecretStr | None = request.app.state.runtime.settings.admin_token
    if expected is None:
        return False
    scheme, _, presented = (authorization or "").strip().partition(" ")
    matches = hmac.compare_digest(_digest(presented.strip()), _digest(expected.get_secret_value()))
    return scheme.lower() == "bearer" and matches


async def require_admin(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """401 unless the admin token is presented; 403 while the admin API is off."""
    if request.app.state.runtime.settings.admin_token is None:
        raise AdminDisabled("the admin API is off: set ADMIN_TOKEN to turn it on")
    if not is_admin(request, authorization):
        raise Unauthorized("the admin API needs 'Authorization: Bearer <ADMIN_TOKEN>'")


#: Router-level guard of every /admin route, and their documented error statuses.
ADMIN_ONLY = [Depends(require_admin)]
ADMIN_ERRORS = error_responses(401, 403)


class QueueStats(BaseModel):
    queue: str
    byStatus: dict[str, int]
    byType: dict[str, dict[str, int]]
    oldestPendingAgeSeconds: float | None
    dead: int


class DeadLetter(BaseModel):
    id: str
    type: str | None
    attempts: int | None
    createdAt: datetime | None
    updatedAt: datetime | None
    lastError: dict[str, Any] | None

    @classmethod
    def of(cls, document: dict[str, Any]) -> "DeadLetter":
        def get(name: str, kind: type) -> Any:
            value = document.get(name)  # dead documents may be garbage: keep only what fits
            return value if isinstance(value, kind) else None

        return cls(
            id=str(document["_id"]),
            type=get("type", str),
            attempts=get("attempts", int),
            createdAt=get("createdAt", datetime),
            updatedAt=get("updatedAt", datetime),
            lastError=get("lastError", dict),
        )


MAX_RETRY_IDS = 1000


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The count limit as prose and a validator, not maxItems: a longer list can also exceed the
    # app's body limit and be answered 413, which a schema violation would have to be a 400 or
    # 422 to be honest about (as POST /ingest's event limit).
    ids: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        description="Dead messages to retry (at most 1000); omit to retry every dead message "
        "of this queue.",
    )

    @field_validator("ids")
    @classmethod
    def _at_most_1000(cls, ids: list[str] | None) -> list[str] | None:
        if ids is not None and len(ids) > MAX_RETRY_IDS:
            raise ValueError(f"at most {MAX_RETRY_IDS} ids per request")
        return ids


class RetryResult(BaseModel):
    retried: int


def queue_admin_router(queue_name: str) -> APIRouter:
    """``/admin/queues/<queue_name>``: stats, dead letters and retry for one queue."""
    router = APIRouter(
        prefix=f"/admin/queues/{queue_name}",
        tags=["admin"],
        dependencies=ADMIN_ONLY,
        responses=ADMIN_ERRORS,
    )

    def queue(request: Request) -> Collection:
        runtime = request.app.state.runtime
        collection: Collection = runtime.client[runtime.settings.bus_db][queue_name]
        return collection

    QueueDep = Annotated[Collection, Depends(queue)]

    @router.get("", response_model=QueueStats)
    async def admin_queue_stats(collection: QueueDep) -> QueueStats:
        """Messages per status and type, the oldest pending message's age, dead letters."""
        return QueueStats(**await queue_stats(collection, now=utcnow()))

    @router.get("/dead", response_model=list[DeadLetter], responses=error_responses(422))
    async def admin_dead_letters(
        collection: QueueDep,
        type_: Annotated[str | None, Query(alias="type", max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[DeadLetter]:
        """Dead messages with their last error, newest first."""
        return [DeadLetter.of(d) for d in await list_dead(collection, type_=type_, limit=limit)]

    @router.post(
        "/dead/retry", response_model=RetryResult, responses=error_responses(400, 413, 422)
    )
    async def admin_retry_dead_letters(body: RetryRequest, collection: QueueDep) -> RetryResult:
        """Dead messages back to pending with a fresh attempt budget (lastError is kept)."""
        return RetryResult(retried=await retry_dead(collection, ids=body.ids, now=utcnow()))

    return router
