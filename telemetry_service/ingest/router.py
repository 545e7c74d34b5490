"""POST /ingest. The CLI treats only 202 as delivered and re-sends anything else with the same
event ids, so a re-sent duplicate is answered 202 and stored once (I2).

The API key is not looked up here: its hash is stored with the events and resolved when the
watcher applies them (I10). So a key the app returned a millisecond ago works at once, and a
well-formed request is never refused for its key: a 401 would make the CLI hold that batch at
the head of its spool, and everything newer behind it, for days."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from pydantic import ValidationError

from shared_contracts import failpoints
from shared_contracts.api_errors import error_responses
from shared_contracts.keys import api_key_hash, presented_key
from telemetry_service import counters
from telemetry_service.deps import RuntimeDep
from telemetry_service.errors import InvalidEvents, InvalidJson, PayloadTooLarge, Unauthorized
from telemetry_service.ingest.schemas import CliEvent, IngestAccepted
from telemetry_service.ingest.storable import unstorable

log = logging.getLogger(__name__)
router = APIRouter(tags=["ingest"])

#: Failpoint: the events are stored, the 202 has not reached the CLI (it will re-send them).
BEFORE_REPLY = "ingest.before_reply"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds the limit (never read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    return bytes(body)


def reject_constant(token: str) -> Any:
    """NaN and Infinity are not JSON (RFC 8259), though Python's parser accepts them."""
    raise ValueError(f"{token} is not valid JSON")


def raw_events(payload: Any, max_events: int) -> tuple[list[Any], bool]:
    """One event is sent bare; two or more as {"events": [...]}. Returns (events, is_batch)."""
    if isinstance(payload, dict) and "events" in payload:
        events = payload["events"]
        if not isinstance(events, list):
            raise InvalidEvents(
                "'events' must be a list", details=[{"loc": "events", "msg": "not a list"}]
            )
        if len(events) > max_events:
            raise PayloadTooLarge(f"{len(events)} events; the limit is {max_events} per request")
        return events, True
    if isinstance(payload, dict):
        return [payload], False
    raise InvalidEvents(
        'the body must be one event object or {"events": [...]}',
        details=[{"loc": "(body)", "msg": f"got {type(payload).__name__}"}],
    )


def validate(events: list[Any], is_batch: bool) -> list[CliEvent]:
    """Every event must match what we use (CliEvent) and be storable as sent; otherwise 422
    naming each problem, and nothing of the request is stored."""
    parsed, problems = [], []
    for index, raw in enumerate(events):
        found: list[tuple[str, str]] = []
        try:
            parsed.append(CliEvent.model_validate(raw))
        except ValidationError as exc:
            found = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()[:10]]
        else:
            found = [hit] if (hit := unstorable(raw)) else []
        prefix = f"events[{index}]" if is_batch else ""
        for path, msg in found:
            loc = f"{prefix}.{path}".strip(".") if path else prefix or "(body)"
            problems.append({"index": index, "loc": loc, "msg": msg})
    if problems:
        bad = len({p["index"] for p in problems})
        raise InvalidEvents(
            f"{bad} of {len(events)} events are invalid; none was stored", details=problems
        )
    return parsed


@router.post(
    "/ingest",
    status_code=202,
    response_model=IngestAccepted,
    responses=error_responses(400, 413, 422),
)
async def ingest(
    request: Request,
    runtime: RuntimeDep,
    x_api_key: Annotated[str | None, Header(include_in_schema=True)] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> IngestAccepted:
    """Accept one CLI event or a batch. 202 also for re-sent duplicates (stored once), and
    whatever the key: it is resolved when the events are applied."""
    settings = runtime.settings
    body = await read_body(request, settings.max_body_bytes)
    try:
        payload = json.loads(body, parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # the parser recurses per nesting level
        raise InvalidJson("the body is nested too deeply to be a CLI event") from None
    events, is_batch = raw_events(payload, settings.max_events_per_request)
    parsed = validate(events, is_batch)
    try:
        key = presented_key(x_api_key, authorization)
    except Unauthorized:  # a malformed Authorization header: as if the CLI had sent no key
        key = None
    key_hash = api_key_hash(key) if key is not None else None
    accepted, duplicates = await store(runtime, events, parsed, key_hash, size_bytes=len(body))
    failpoints.hit(BEFORE_REPLY)
    counters.EVENTS_RECEIVED.labels("accepted").inc(accepted)
    counters.EVENTS_RECEIVED.labels("duplicate").inc(duplicates)
    return IngestAccepted(accepted=accepted, duplicates=duplicates)


async def store(
    runtime: RuntimeDep,
    events: list[Any],
    parsed: list[CliEvent],
    key_hash: str | None,
    *,
    size_bytes: int,
) -> tuple[int, int]:
    """The request's events, once each, through the process's group writer; a duplicate key is
    an event we already have."""
    now = datetime.now(UTC)
    documents: dict[str, dict[str, Any]] = {}
    for raw, event in zip(events, parsed, strict=True):
        documents.setdefault(
            event.event_id,
            {
                "_id": event.event_id,
                "raw": raw,
                "distinctId": event.distinct_id,
                "keyHash": key_hash,
                "receivedAt": now,
            },
        )
    within_request = len(parsed) - len(documents)
    if not documents:  # an empty batch: nothing to store, nothing lost
        return 0, 0
    result = await runtime.event_writer.store(list(documents.values()), size_bytes=size_bytes)
    return result.stored, within_request + result.duplicates
