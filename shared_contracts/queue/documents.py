"""How a message is stored on a queue, and how a stored document becomes a message again.

A queue document is flat: the message's payload fields at the top level plus the queue's own
fields below. Parsing never trusts the document: anything unreadable raises InvalidMessage, which
the consumer dead-letters instead of crashing.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import ValidationError

from shared_contracts.messages import Message
from shared_contracts.request_context import current_request_id

PENDING: Final = "pending"
ACTIVE: Final = "active"
DONE: Final = "done"
DEAD: Final = "dead"
STATUSES: Final = (PENDING, ACTIVE, DONE, DEAD)

#: availableAt of a message waiting behind an earlier one with the same ordering key. Keeping the
#: wait in availableAt is what lets the claim query stay one indexed range with no $or.
PARKED: Final = datetime(9999, 12, 31, tzinfo=UTC)

QUEUE_FIELDS: Final = frozenset(
    {
        "_id",
        "status",
        "attempts",
        "maxAttempts",
        "availableAt",
        "leaseUntil",
        "claimToken",
        "claimedBy",
        "createdAt",
        "updatedAt",
        "payloadSeq",
        "doneAt",
        "lastError",
        "dedupeKey",
        "orderingKey",
        "orderSeq",
        "supersededAt",
        # The HTTP request that published it (optional): for logs, never part of the payload.
        "requestId",
    }
)


class InvalidMessage(Exception):
    """The stored document is not a message this consumer can read; it goes straight to dead."""


def new_document(
    message: Message, *, now: datetime, max_attempts: int, order_seq: int | None = None
) -> dict[str, Any]:
    document = message.model_dump(mode="python")
    document.update(
        status=PENDING,
        attempts=0,
        maxAttempts=max_attempts,
        availableAt=now,
        leaseUntil=None,
        claimToken=None,
        claimedBy=None,
        createdAt=now,
        updatedAt=now,
        lastError=None,
    )
    if (request_id := current_request_id()) is not None:
        document["requestId"] = request_id
    if (dedupe_key := message.dedupe_key()) is not None:
        document["dedupeKey"] = dedupe_key
        # When the payload was published: of two messages of one key, the later payload wins
        # (a pending message absorbs newer payloads, so its orderSeq does not say).
        document["payloadSeq"] = time.time_ns()
    if (ordering_key := message.ordering_key()) is not None:
        document["orderingKey"] = ordering_key
        document["orderSeq"] = order_seq
    return document


def payload_of(document: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key not in QUEUE_FIELDS}


def parse_message(document: Mapping[str, Any], types: Mapping[str, type[Message]]) -> Message:
    kind = document.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidMessage("missing or non-string 'type'")
    model = types.get(kind)
    if model is None:
        raise InvalidMessage(f"unknown message type {kind!r} on this queue")
    version = document.get("schemaVersion")
    if type(version) is not int or version not in model.SUPPORTED_VERSIONS:
        supported = sorted(model.SUPPORTED_VERSIONS)
        raise InvalidMessage(
            f"unsupported schemaVersion {version!r} for {kind} (reads {supported})"
        )
    try:
        return model.model_validate(payload_of(document))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise InvalidMessage(f"invalid {kind}: {problems}") from None


def error_record(error: BaseException, *, now: datetime, attempt: int | None) -> dict[str, Any]:
    """What lastError holds: enough to diagnose without a log search, bounded in size."""
    frames = traceback.format_exception(type(error), error, error.__traceback__, limit=-5)
    return {
        "type": type(error).__name__,
        "message": str(error)[:1000],
        "traceback": "".join(frames)[-2000:],
        "at": now,
        "attempt": attempt,
    }
