"""The one way every process opens MongoDB, so all clients agree on time zones and codecs."""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.results import DeleteResult, UpdateResult

T = TypeVar("T")
log = logging.getLogger(__name__)


def make_client(uri: str, *, app_name: str, **kwargs: Any) -> AsyncMongoClient[dict[str, Any]]:
    # tz_aware: every datetime we read back is UTC-aware, so comparisons with now() never mix
    # naive and aware values.
    return AsyncMongoClient(uri, tz_aware=True, appname=app_name, **kwargs)


#: Follow-ups of the transactions in_transaction runs, by session: work that must see the
#: transaction's writes committed (after_commit).
_AFTER_COMMIT: dict[int, list[Callable[[], Awaitable[Any]]]] = {}


async def in_transaction(
    client: AsyncMongoClient[dict[str, Any]],
    work: Callable[[AsyncClientSession], Awaitable[T]],
) -> T:
    """Run ``work`` in one transaction; with_transaction retries transient errors and unknown
    commit results, so ``work`` must be safe to run again from the start. Then the follow-ups
    its last attempt registered (after_commit), in order."""
    async with client.start_session() as session:
        key = id(session)

        async def attempt(attempt_session: AsyncClientSession) -> T:
            _AFTER_COMMIT[key] = []  # an aborted attempt's follow-ups are not done
            return await work(attempt_session)

        try:
            result = await session.with_transaction(attempt)
            follow_ups = _AFTER_COMMIT.get(key, [])
        finally:
            _AFTER_COMMIT.pop(key, None)
    for follow_up in follow_ups:
        try:
            await follow_up()
        except Exception:
            # The transaction committed: its caller must not be told it failed, whatever the
            # follow-up raised (a driver error or a bug), and the follow-ups after it still
            # run. Every follow-up is one a periodic task also does (Queue.reap).
            log.warning("a follow-up of a committed transaction failed", exc_info=True)
    return result


def after_commit(session: AsyncClientSession, follow_up: Callable[[], Awaitable[Any]]) -> bool:
    """Run ``follow_up`` once the transaction of ``session`` has committed. False when that
    transaction is not one in_transaction runs: then nothing will run it."""
    follow_ups = _AFTER_COMMIT.get(id(session))
    if follow_ups is None:
        return False
    follow_ups.append(follow_up)
    return True


# --- multi-document writes outside a caller's transaction -------------------------------------
# Every update_many / delete_many that is not part of a caller's transaction goes through these
# (tests/test_multi_document_writes.py checks the syntax tree). The reason is the embedded
# server (tests/test_embedded_gaps.py): it retries a plain multi-document write's conflict with a
# transaction while holding the collection's lock, so the transaction can never finish and the
# server deadlocks. Inside a transaction a conflict aborts at once and with_transaction retries
# it. On mongod it costs one commitTransaction and makes the write all or nothing.
#
# update_many / delete_many: a set bounded by a batch (a claim, a lease renewal), in one
# transaction. update_all / delete_all: a set of any size (an operator's "all", housekeeping),
# in transactions of at most CHUNK documents: one transaction over an unbounded set would run
# into mongod's 60 s transaction limit.

#: Documents per transaction in update_all / delete_all.
CHUNK = 1000

#: Values per $in query. Bounded so that no single statement grows with a batch: the embedded
#: server's $in cost is superlinear in the list (0.09 ms/id at 50 ids, 0.4 at 500) and a
#: 15,000-id $in outlived its transaction; on mongod it keeps each command's size bounded.
MAX_IN_IDS = 500


async def update_many(
    collection: AsyncCollection[dict[str, Any]],
    query: Mapping[str, Any],
    update: Mapping[str, Any],
) -> UpdateResult:
    """``collection.update_many`` of a bounded set, in a transaction of its own."""

    async def write(session: AsyncClientSession) -> UpdateResult:
        return await collection.update_many(query, update, session=session)

    return await in_transaction(collection.database.client, write)


async def delete_many(
    collection: AsyncCollection[dict[str, Any]], query: Mapping[str, Any]
) -> DeleteResult:
    """``collection.delete_many`` of a bounded set, in a transaction of its own."""

    async def write(session: AsyncClientSession) -> DeleteResult:
        return await collection.delete_many(query, session=session)

    return await in_transaction(collection.database.client, write)


async def update_all(
    collection: AsyncCollection[dict[str, Any]],
    query: Mapping[str, Any],
    update: Mapping[str, Any],
    *,
    chunk: int = CHUNK,
) -> int:
    """Update every document matching ``query``, however many: in ``_id`` order, ``chunk`` at a
    time, each chunk in a transaction of its own that checks ``query`` again. Each document is
    visited once even if it still matches after the update. Returns how many were modified.
    Nothing matching costs one read."""
    modified = 0
    async for ids in _chunks_of_ids(collection, query, chunk):
        result = await update_many(collection, _within(query, ids), update)
        modified += result.modified_count
    return modified


async def delete_all(
    collection: AsyncCollection[dict[str, Any]], query: Mapping[str, Any], *, chunk: int = CHUNK
) -> int:
    """Delete every document matching ``query``, ``chunk`` at a time (see ``update_all``)."""
    deleted = 0
    async for ids in _chunks_of_ids(collection, query, chunk):
        result = await delete_many(collection, _within(query, ids))
        deleted += result.deleted_count
    return deleted


def _within(query: Mapping[str, Any], ids: list[Any]) -> dict[str, Any]:
    """``query`` over a chunk's span of ids. A range, not the ids: on the embedded server a
    1,000-id ``$in`` next to other conditions is tested against every document (25x a range).
    Chunks never mix id types, since ``$gte``/``$lte`` compare within one BSON type."""
    return {"$and": [query, {"_id": {"$gte": ids[0], "$lte": ids[-1]}}]}


async def _chunks_of_ids(
    collection: AsyncCollection[dict[str, Any]], query: Mapping[str, Any], chunk: int
) -> AsyncIterator[list[Any]]:
    """The ids matching ``query``, in ``_id`` order (one cursor: paging by ``_id > last`` would
    skip the ids of every BSON type after the last one's), cut into chunks of at most
    ``chunk`` ids of one type."""
    ids: list[Any] = []
    cursor = collection.find(query, {"_id": 1}, sort=[("_id", 1)], batch_size=chunk)
    async for document in cursor:
        if ids and (len(ids) == chunk or type(ids[-1]) is not type(document["_id"])):
            yield ids
            ids = []
        ids.append(document["_id"])
    if ids:
        yield ids
