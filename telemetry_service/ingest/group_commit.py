"""Concurrent requests' events stored together: one arrival reservation and one ``insert_many``
for every request that came while the previous write was in flight (group commit, as databases
do for their logs). A request that finds no write in flight is written at once, so nothing waits
for company; under load each request costs a fraction of two commands, which is what bounds
ingest on a server that pays per command.

What a request sees does not change: its events are numbered consecutively in the order the
requests reached the writer (arrival order, I3 and I11), a re-sent duplicate is counted as one,
and it fails if and only if its own events could not be stored.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from pymongo.errors import BulkWriteError, PyMongoError

from telemetry_service.collections import EVENTS, Database
from telemetry_service.ingest import arrival

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
#: Documents written in one group at most (PyMongo splits a larger insert by message size
#: anyway; this bounds how much one failure fails, and how long one write takes).
GROUP_MAX_DOCUMENTS = 1000


@dataclass(slots=True)
class StoreResult:
    """Of one request's documents: how many were stored now and how many we had already."""

    stored: int
    duplicates: int


@dataclass(slots=True)
class _Request:
    documents: list[dict[str, Any]]
    #: The write of the group this request is in, once a leader has taken it into one.
    write: asyncio.Future[None] | None = None
    result: StoreResult | None = None
    error: BaseException | None = None


class EventWriter:
    """One per process. ``store`` returns once the request's documents are written (or raises
    what kept them from being written)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._waiting: list[_Request] = []
        # One write at a time: the requests that arrive meanwhile form the next group. FIFO, so
        # the earliest waiter leads the next write, under its own request's database budget.
        self._turn = asyncio.Lock()

    async def store(self, documents: list[dict[str, Any]]) -> StoreResult:
        """Documents with distinct ``_id``s; each gets its ``seq`` here."""
        request = _Request(documents)
        self._waiting.append(request)
        async with self._turn:
            if request.write is None:  # nobody took it into a group while we waited: lead one
                group = self._next_group()
                # A task of its own (in this request's context, so under its budget): a leader
                # whose client goes away stops waiting, the group's write goes on.
                write = asyncio.ensure_future(self._write(group))
                for member in group:
                    member.write = write
                await asyncio.wait([write])  # the next group forms meanwhile
        assert request.write is not None
        await asyncio.wait([request.write])
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _next_group(self) -> list[_Request]:
        group: list[_Request] = []
        size = 0
        while self._waiting and (not group or size + len(self._waiting[0].documents)
                                 <= GROUP_MAX_DOCUMENTS):  # fmt: skip
            request = self._waiting.pop(0)
            group.append(request)
            size += len(request.documents)
        return group

    async def _write(self, group: list[_Request]) -> None:
        stored = [document for request in group for document in request.documents]
        try:
            first = await arrival.reserve(self.db, len(stored))
            for position, document in enumerate(stored):
                document["seq"] = first + position
            await self.db[EVENTS].insert_many(stored, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            self._tell(group, errors, exc)
            # Numbers that will never hold an event: the watcher need not wait for them. Best
            # effort: without the record it passes them after INGEST_GAP_WAIT_SECONDS.
            holes = [stored[e["index"]]["seq"] for e in errors]
            try:
                await arrival.record_holes(self.db, holes)
            except PyMongoError as record_failed:
                log.warning("%d arrival holes not recorded: %s", len(holes), record_failed)
        except BaseException as exc:  # nothing is known of the group: it failed as a whole
            for request in group:
                request.error = exc
            if not isinstance(exc, Exception):
                raise
        else:
            self._tell(group, [], None)

    @staticmethod
    def _tell(
        group: list[_Request], errors: list[dict[str, Any]], exc: BulkWriteError | None
    ) -> None:
        """Each request's own outcome from the group's write errors (indexes into the group)."""
        offset = 0
        for request in group:
            end = offset + len(request.documents)
            mine = [e for e in errors if offset <= e["index"] < end]
            offset = end
            if any(e.get("code") != DUPLICATE_KEY for e in mine):
                request.error = exc
            else:
                request.result = StoreResult(len(request.documents) - len(mine), len(mine))
