"""Concurrent requests' events stored together: one arrival reservation and one ``insert_many``
for every request that came while the previous write was in flight (group commit, as databases
do for their logs). A request that finds no write in flight is written at once, so nothing waits
for company; under load each request costs a fraction of two commands, which is what bounds
ingest on a server that pays per command.

What a request sees does not change: its events are numbered consecutively in the order the
requests reached the writer (arrival order, I3 and I11), a re-sent duplicate is counted as one,
and it fails only for its own events: their write failed, or did not end within its database
budget (503; the write may still land, and the CLI's re-send is then answered as duplicates).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass
from typing import Any

import pymongo
from pymongo.errors import BulkWriteError, ExecutionTimeout, PyMongoError

from telemetry_service.collections import EVENTS, Database
from telemetry_service.ingest import arrival

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
#: A group's size at most, in documents and in request bytes (PyMongo splits a larger insert by
#: message size anyway; these bound how much one failure fails, and how long one write takes).
GROUP_MAX_DOCUMENTS = 1000
GROUP_MAX_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class StoreResult:
    """Of one request's documents: how many were stored now and how many we had already."""

    stored: int
    duplicates: int


@dataclass(slots=True)
class _Request:
    documents: list[dict[str, Any]]
    size_bytes: int
    #: The write of the group this request is in, once a leader has taken it into one.
    write: asyncio.Task[None] | None = None
    result: StoreResult | None = None
    error: BaseException | None = None


class EventWriter:
    """One per process. ``store`` returns once the request's documents are written, or raises
    what kept them from being written (ExecutionTimeout after ``budget_seconds``: a 503)."""

    def __init__(self, db: Database, *, budget_seconds: float | None) -> None:
        self.db = db
        self.budget_seconds = budget_seconds or None  # 0: no budget, as for requests
        self._waiting: list[_Request] = []
        #: The write in flight. One at a time, whatever happens to the request that started
        #: it: a second write alongside could number a later request first.
        self._writing: asyncio.Task[None] | None = None

    async def store(self, documents: list[dict[str, Any]], *, size_bytes: int) -> StoreResult:
        """Documents with distinct ``_id``s; each gets its ``seq`` here."""
        request = _Request(documents, size_bytes)
        self._waiting.append(request)
        try:
            async with asyncio.timeout(self.budget_seconds):
                await self._written(request)
        except TimeoutError:
            raise ExecutionTimeout(
                "the events were not stored within the request's database budget"
            ) from None
        finally:
            if request.write is None:  # gone before any group took it: nobody writes it now
                self._waiting.remove(request)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    async def _written(self, request: _Request) -> None:
        """Lead the next write when none is in flight, else wait for it; until a group holds
        this request, then until that group is written."""
        while request.write is None:
            if self._writing is None or self._writing.done():
                self._writing = self._start(self._next_group())
            else:
                await asyncio.wait([self._writing])
        await asyncio.wait([request.write])

    def _start(self, group: list[_Request]) -> asyncio.Task[None]:
        # A task of its own, under a budget of its own: neither its leader's client going away
        # nor the leader's nearly spent budget (it waited longest) fails the others' write.
        write = asyncio.get_running_loop().create_task(
            self._write(group), context=contextvars.Context()
        )
        for member in group:
            member.write = write
        return write

    def _next_group(self) -> list[_Request]:
        """The waiting requests in the order they came, as many as the group's bounds take
        (always at least one)."""
        group: list[_Request] = []
        documents = size = 0
        for request in self._waiting:
            documents += len(request.documents)
            size += request.size_bytes
            if group and (documents > GROUP_MAX_DOCUMENTS or size > GROUP_MAX_BYTES):
                break
            group.append(request)
        del self._waiting[: len(group)]
        return group

    async def _write(self, group: list[_Request]) -> None:
        stored = [document for request in group for document in request.documents]
        try:
            with pymongo.timeout(self.budget_seconds):
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
                with pymongo.timeout(self.budget_seconds):
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
