"""How far the watcher got: one document over the arrival sequence, not a write per event.

An event is written once, by POST /ingest. The watcher reads events in arrival order above a
high-water mark (``through``) and commits the new mark in the same transaction as their effects,
so an event is applied exactly once (I2) without ever being updated: the progress document is
the only write that grows with the number of batches, not of events (the design of log-based
readers such as Marten's async daemon).

The mark is gap-aware. A request reserves its numbers, then inserts (ingest/arrival.py), so a
lower number can still be in flight when a higher one is visible. The mark stops below such a
hole (arrival order, I3/I11) until the hole is ``INGEST_GAP_WAIT_SECONDS`` old, then skips it
but remembers it in ``gaps``: an event that lands there later is still applied, out of order,
for ``GAP_KEEP`` after. Holes that can never fill (a re-sent duplicate's number, an insert that
failed) are recorded by ingest in ``arrival_holes`` and skipped at once.

The same document is the watcher's lease (one replica applies the main line at a time) and
counts the attempts at the batch above the mark, so a batch that keeps killing its worker is
copied aside (processing/aside.py) instead of stopping the main line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession

from telemetry_service.collections import (
    ARRIVAL_HOLES,
    EVENTS,
    EVENTS_ASIDE,
    MAIN_LINE,
    PROGRESS,
    Database,
)

#: How long a skipped gap is still looked at: far beyond any insert's lifetime (a request's
#: database calls time out long before), so an event accepted late is never left behind.
GAP_KEEP: Final = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Gap:
    """Arrival numbers the mark passed without their events (first..last, inclusive)."""

    first: int
    last: int
    skipped_at: datetime

    def to_document(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "skippedAt": self.skipped_at}


@dataclass(slots=True)
class Progress:
    through: int
    gaps: list[Gap] = field(default_factory=list)
    #: Leases taken since the mark last moved: tries at the batch above it.
    attempts: int = 0

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Progress:
        gaps = [Gap(g["first"], g["last"], g["skippedAt"]) for g in document.get("gaps", [])]
        return cls(int(document["through"]), gaps, int(document.get("attempts", 0)))


async def lease(db: Database, *, owner: str, seconds: float) -> Progress | None:
    """Take (or keep) the main line for ``seconds`` and count one attempt; None while another
    replica holds it."""
    now = datetime.now(UTC)
    document = await db[PROGRESS].find_one_and_update(
        {"_id": MAIN_LINE, "$or": [{"leaseUntil": {"$lte": now}}, {"owner": owner},
                                   {"leaseUntil": {"$exists": False}}]},
        {"$set": {"owner": owner, "leaseUntil": now + timedelta(seconds=seconds)},
         "$inc": {"attempts": 1}},
        return_document=ReturnDocument.AFTER,
    )  # fmt: skip
    return Progress.from_document(document) if document else None


async def release(db: Database, *, owner: str) -> None:
    """Nothing (applicable) was above the mark: that lease was no attempt at a batch, and an
    idle worker does not keep the main line from a replica that has work."""
    await db[PROGRESS].update_one(
        {"_id": MAIN_LINE, "owner": owner},
        {"$set": {"leaseUntil": datetime.now(UTC)}, "$inc": {"attempts": -1}},
    )


async def let_go(db: Database, *, owner: str) -> None:
    """A stopping worker hands the main line on at once, whether or not its last lease was an
    attempt at a batch (so its attempts stay counted)."""
    await db[PROGRESS].update_one(
        {"_id": MAIN_LINE, "owner": owner}, {"$set": {"leaseUntil": datetime.now(UTC)}}
    )


async def renew(db: Database, *, owner: str, seconds: float) -> None:
    await db[PROGRESS].update_one(
        {"_id": MAIN_LINE, "owner": owner},
        {"$set": {"leaseUntil": datetime.now(UTC) + timedelta(seconds=seconds)}},
    )


async def advance(
    db: Database,
    *,
    owner: str,
    read: Progress,
    to: Progress,
    session: AsyncClientSession,
) -> bool:
    """Move the mark in the batch's transaction. False when ``read`` is no longer current (the
    lease was lost and another replica moved it): the caller aborts, nothing counts twice."""
    result = await db[PROGRESS].update_one(
        {"_id": MAIN_LINE, "owner": owner, "through": read.through},
        {
            "$set": {
                "through": to.through,
                "gaps": [g.to_document() for g in to.gaps],
                "attempts": 0,
                "advancedAt": datetime.now(UTC),
            },
            "$inc": {"batches": 1},
        },
        session=session,
    )
    return result.modified_count == 1


async def above_mark(db: Database, progress: Progress, *, limit: int) -> list[dict[str, Any]]:
    """Stored events above the mark and in its remembered gaps, in arrival order.

    One read per range (the mark, then each remembered gap), never one ``$or`` of them: the
    embedded server plans no ``$or`` (tests/test_embedded_gaps.py), and for the hour a gap is
    remembered every batch read scanned every event ever stored.

    Above the mark it reads a window of ``limit`` arrival numbers, not "above the mark, the
    first ``limit``": numbers are unique, so the window holds at most ``limit`` events, and
    the embedded server reads every document an open range matches before it applies the
    limit: a backlog of N drained in batches of B cost N²/2B reads (bench/RESULTS.md, "Watcher
    alone", batches up to 500). Only a window with no event at all (every number in it a hole)
    costs a second, open read, so that the main line never stops in front of a long run of
    holes."""
    found: dict[Any, dict[str, Any]] = {}  # by _id: ranges never overlap, but nothing relies on it

    async def read(clause: dict[str, Any]) -> int:
        cursor = db[EVENTS].find(clause, sort=[("seq", 1)], limit=limit, batch_size=limit + 1)
        documents = {document["_id"]: document async for document in cursor}
        found.update(documents)
        return len(documents)

    for clause in _in_gaps(progress):  # bounded already
        await read(clause)
    window = {"$gt": progress.through, "$lte": progress.through + limit}
    if not await read({"seq": window}):
        await read({"seq": {"$gt": progress.through + limit}})
    return sorted(found.values(), key=lambda document: int(document["seq"]))[:limit]


async def unapplied_on_devices(
    db: Database, devices: list[str], *, below: int, session: AsyncClientSession
) -> list[dict[str, Any]]:
    """The unapplied events of these devices numbered below ``below``, wherever they wait:
    aside, above the mark or in its gaps (what ``count_unapplied`` counts), a few fields each.

    No ``$or``, for the reason ``above_mark`` gives (inside the watcher's transaction it read
    every stored event: 0.6 s at 20,000). One read of the copies aside (index ``by_device``)
    and one per range of the main line below ``below`` (index
    ``arrival``); a range's devices are picked here, as a query naming both fields is planned on
    neither index there. Above the mark, below a batch's own events, that range holds little
    more than the batch."""
    document = await db[PROGRESS].find_one({"_id": MAIN_LINE}, session=session)
    progress = Progress.from_document(document) if document else Progress(0)
    fields = {"distinctId": 1, "seq": 1, "keyHash": 1, "dead": 1, "lastError": 1, "processed": 1}
    wanted = set(devices)
    # By device alone, and the applied copies (kept a while for operators) left out here: the
    # embedded server scans the collection for a query naming a field outside its index.
    aside = db[EVENTS_ASIDE].find({"distinctId": {"$in": sorted(wanted)}}, fields, session=session)
    found = [d async for d in aside if d.get("processed") is False]
    for clause in _not_passed(progress, below=below):
        on_main_line = await db[EVENTS].find(clause, fields, session=session).to_list()
        found += [d for d in on_main_line if "processed" not in d and d.get("distinctId") in wanted]
    unique = {d["_id"]: d for d in found if isinstance(d.get("seq"), int) and d["seq"] < below}
    return list(unique.values())


async def known_holes(db: Database, first: int, last: int) -> set[int]:
    """Numbers in first..last that ingest recorded will never be stored."""
    found = db[ARRIVAL_HOLES].find({"_id": {"$gte": first, "$lte": last}}, {"_id": 1})
    return {int(d["_id"]) async for d in found}


#: Why a hole in the arrival sequence may be passed: it can never fill (ingest recorded it), or
#: it is older than the gap wait (then it is remembered in ``gaps``). None: wait at it.
HoleVerdict = Literal["never_fills", "old"] | None


@dataclass(slots=True)
class Step:
    """What one batch does to the main line: the events it takes, and the mark after them."""

    take: list[dict[str, Any]]
    to: Progress
    #: Lowest number of a hole the mark is waiting at (None: not waiting).
    waiting_at: int | None = None


def step(
    progress: Progress,
    documents: list[dict[str, Any]],
    *,
    hole_ready: Callable[[int, int], HoleVerdict],
    now: datetime,
) -> Step:
    """Take documents in arrival order while the numbers are contiguous above the mark.

    ``documents``: above_mark's answer (sorted by seq). ``hole_ready(first, last)``: whether a
    hole may be passed now, and why. Documents in remembered gaps
    are always taken (they landed late), and their numbers leave the gaps.
    """
    through, take = progress.through, []
    late = {int(d["seq"]) for d in documents if int(d["seq"]) <= progress.through}
    gaps = [
        piece
        for gap in progress.gaps
        if now - gap.skipped_at < GAP_KEEP
        for piece in _without(gap, late)
    ]
    skipped: list[Gap] = []
    waiting_at = None
    for document in documents:
        seq = int(document["seq"])
        if seq <= progress.through:
            take.append(document)
            continue
        if seq > through + 1:
            verdict = hole_ready(through + 1, seq - 1)
            if verdict is None:
                waiting_at = through + 1
                break
            if verdict == "old":
                skipped.append(Gap(through + 1, seq - 1, now))
        take.append(document)
        through = seq
    return Step(take, Progress(through, gaps + skipped, progress.attempts), waiting_at)


def _without(gap: Gap, numbers: set[int]) -> list[Gap]:
    """The gap minus the numbers that landed in it."""
    pieces, start = [], gap.first
    for n in sorted(x for x in numbers if gap.first <= x <= gap.last):
        if n > start:
            pieces.append(Gap(start, n - 1, gap.skipped_at))
        start = n + 1
    if start <= gap.last:
        pieces.append(Gap(start, gap.last, gap.skipped_at))
    return pieces


#: The copies aside not applied yet (waiting, retrying, set aside), in ``events_aside``.
UNAPPLIED_ASIDE: Final = {"processed": False}


def unapplied_query(progress_document: dict[str, Any] | None) -> dict[str, Any]:
    """A query over ``events`` for those not applied that wait there: above the mark or in its
    gaps, and an older release's kept aside but not adopted yet (``processed: false``; adopted
    ones carry ``processed: true``). With UNAPPLIED_ASIDE over ``events_aside``, the definition
    of an unapplied event, for counting them; the watcher reads them with
    ``unapplied_on_devices`` (no ``$or``, for the embedded server)."""
    progress = Progress.from_document(progress_document) if progress_document else Progress(0)
    return {
        "$or": [
            {"processed": False},
            {"processed": {"$exists": False}, "$or": _not_passed(progress)},
        ]
    }


async def count_unapplied(db: Database, *, session: AsyncClientSession | None = None) -> int:
    """Events not applied yet, wherever they wait."""
    progress = await db[PROGRESS].find_one({"_id": MAIN_LINE}, session=session)
    in_events = unapplied_query(progress)
    return await db[EVENTS].count_documents(in_events, session=session) + await db[
        EVENTS_ASIDE
    ].count_documents(UNAPPLIED_ASIDE, session=session)


def _not_passed(progress: Progress, *, below: int | None = None) -> list[dict[str, Any]]:
    """Arrival numbers the main line has not applied: above the mark, or in a remembered gap
    (only those under ``below``, when given)."""
    ranges: list[dict[str, Any]] = [{"$gt": progress.through}]
    ranges += [clause["seq"] for clause in _in_gaps(progress)]
    if below is not None:
        ranges = [under for bounds in ranges if (under := _under(bounds, below)) is not None]
    return [{"seq": bounds} for bounds in ranges]


def _in_gaps(progress: Progress) -> list[dict[str, Any]]:
    """One query per remembered gap: the numbers the mark passed without their events."""
    return [{"seq": {"$gte": g.first, "$lte": g.last}} for g in progress.gaps]


def _under(bounds: dict[str, Any], below: int) -> dict[str, Any] | None:
    """The range's numbers under ``below``; None when it has none."""
    first = bounds["$gte"] if "$gte" in bounds else bounds["$gt"] + 1
    last = min(bounds.get("$lte", below - 1), below - 1)
    return {**bounds, "$lte": last} if first <= last else None
