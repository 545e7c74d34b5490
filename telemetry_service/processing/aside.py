"""Events aside: those the main line passed without applying them, in a collection of their own.

``events`` is the log: each event is written once, by its insert, and carries one index, its
arrival number, which is all the main line reads by (processing/progress.py). Every further
index there is paid by every insert, and the embedded server keeps a key in a partial or sparse
index for every document (tests/test_embedded_gaps.py): the three indexes that served only the
few events set aside cost every insert a third of its rate (bench/RESULTS.md).

So an event the main line cannot apply now (waiting for its key, behind one that waits, in a
batch that failed, unreadable) is *copied* here, same ``_id`` and fields, with the state of its
claim: ``processed`` (false until applied), ``leaseUntil``, ``attempts``, ``claimToken``,
``dead``, ``lastError``. The copy is written in the transaction that moves the main line's mark
past the event, and marked processed in the transaction that applies it: the event is in
exactly one place to be applied from. Applied copies stay ``APPLIED_KEPT`` for operators, then
expire. In ``events``, a ``processed`` field is an older release's (see adopt_older_release).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure

from shared_contracts.mongo import MAX_IN_IDS, in_transaction
from shared_contracts.queue.documents import PARKED
from telemetry_service.collections import (
    EVENTS,
    EVENTS_ASIDE,
    MIGRATIONS,
    UNCLAIMED,
    Database,
    find_by_ids,
)
from telemetry_service.ingest.arrival import number_unsequenced

log = logging.getLogger(__name__)

#: The claim state of an event aside; everything else is the stored event as ingest wrote it.
CLAIM_STATE: Final = frozenset(
    {"processed", "processedAt", "leaseUntil", "attempts", "claimToken", "dead", "lastError",
     "lastClaimError", "setAsideAt", "retriedAt", "adoptedAt"}
)  # fmt: skip
#: Older releases' indexes on ``events`` that served their events aside (and, older still, a
#: claim over every event in the client's random event-id order); dropped once adopted.
OLDER_RELEASE_INDEXES: Final = (
    "aside", "unprocessed_by_device", "claim_token", "claim", "claim_arrival"
)  # fmt: skip
#: How that release defined them: what its events aside were claimed and looked up by.
OLDER_RELEASE_ASIDE_INDEXES: Final = (
    IndexModel([("processed", ASCENDING), ("seq", ASCENDING)], name="aside",
               partialFilterExpression={"processed": False}),
    IndexModel([("distinctId", ASCENDING), ("seq", ASCENDING)], name="unprocessed_by_device",
               partialFilterExpression={"processed": False}),
    IndexModel([("claimToken", ASCENDING)], name="claim_token", sparse=True),
)  # fmt: skip
#: Events adopted per transaction.
ADOPT_CHUNK: Final = 500
#: Its document in ``migrations``: the adoption at this release's first start is done.
ADOPTION: Final = "events_aside_adoption"


def _copy(document: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The stored event with a fresh claim state (an older release's state is not carried)."""
    return {**{k: v for k, v in document.items() if k not in CLAIM_STATE}, **state}


async def move_aside(
    db: Database,
    documents: Iterable[dict[str, Any]],
    *,
    state: dict[str, Any],
    session: AsyncClientSession,
) -> None:
    """Copy stored events aside with ``state`` (``processed`` is set false here), in the
    caller's transaction. Inserts, never upserts: an event may hold field names starting with
    ``$`` (the CLI's ``$repo_id``), which an insert stores as sent and an update refuses. A copy
    already there keeps its state: that happens only in a transaction about to lose its lease
    (a copy is written where the mark passes its event, and a rival got there first)."""
    wanted = {d["_id"]: d for d in documents}
    if not wanted:
        return
    present = await find_by_ids(db[EVENTS_ASIDE], wanted, projection={"_id": 1}, session=session)
    copies = [
        _copy(d, {"processed": False, **state}) for i, d in wanted.items() if i not in present
    ]
    for start in range(0, len(copies), MAX_IN_IDS):
        await db[EVENTS_ASIDE].insert_many(copies[start : start + MAX_IN_IDS], session=session)


def applied_update() -> dict[str, Any]:
    """What applying an event aside writes on its copy, in the batch's transaction."""
    return {
        "$set": {"processed": True, "processedAt": datetime.now(UTC), "leaseUntil": PARKED},
        "$unset": {"claimToken": ""},
    }


async def adopt_older_release(db: Database, *, look: bool = False) -> int:
    """Move the events an older release kept aside in ``events`` (``processed: false`` there)
    into ``events_aside``, each chunk in one transaction that also marks them adopted in
    ``events`` (``processed: true``, ``adoptedAt``): never both places, never neither. Then
    drop the indexes only they needed. Returns how many were adopted.

    Runs at every worker start, before the watcher; it looks once, at the first start of this
    release (recorded in ``migrations``), with the older release's index or, when there is none
    (a release older still), by reading every stored event once. Later starts cost one read.
    ``look`` (``swamp-club events adopt``) looks again: for what an older release's workers,
    still running, kept aside after that (``telemetry verify`` counts them). Their claim state
    (attempts, a set-aside reason and its parked lease) is kept; a claim in flight is not: its
    lease runs out as it would have."""
    if not look and await db[MIGRATIONS].find_one({"_id": ADOPTION}):
        return 0
    # Events from before the arrival sequence are numbered first, in receipt order.
    await number_unsequenced(db)
    adopted = 0
    while moved := await in_transaction(db.client, lambda s: _adopt_chunk(db, s)):
        adopted += moved
    indexes = await db[EVENTS].index_information()
    for name in (n for n in OLDER_RELEASE_INDEXES if n in indexes):
        try:
            await db[EVENTS].drop_index(name)
        except OperationFailure:  # another replica starting at once dropped it first
            log.info("index events.%s already dropped", name)
    await db[MIGRATIONS].update_one(
        {"_id": ADOPTION},
        {"$set": {"status": "done", "at": datetime.now(UTC)}, "$inc": {"adopted": adopted}},
        upsert=True,
    )
    if adopted:
        log.warning("adopted %d events an older release kept aside", adopted)
    return adopted


async def _adopt_chunk(db: Database, session: AsyncClientSession) -> int:
    older = await (
        db[EVENTS].find({"processed": False}, session=session, limit=ADOPT_CHUNK).to_list()
    )
    if not older:
        return 0
    now = datetime.now(UTC)
    await db[EVENTS].update_many(
        {"_id": {"$in": [d["_id"] for d in older]}, "processed": False},
        {"$set": {"processed": True, "adoptedAt": now}},
        session=session,
    )
    present = await find_by_ids(
        db[EVENTS_ASIDE], [d["_id"] for d in older], projection={"_id": 1}, session=session
    )
    copies = [
        {**_copy(d, {}), **_kept_state(d), "adoptedAt": now}
        for d in older
        if d["_id"] not in present
    ]
    if copies:
        await db[EVENTS_ASIDE].insert_many(copies, session=session)
    return len(older)


def _kept_state(document: dict[str, Any]) -> dict[str, Any]:
    """An older release's claim state, less its claim in flight."""
    kept = ("attempts", "dead", "lastError", "setAsideAt")
    state: dict[str, Any] = {k: document[k] for k in kept if k in document}
    lease = PARKED if state.get("dead") else document.get("leaseUntil", UNCLAIMED)
    return {**state, "processed": False, "leaseUntil": lease}
