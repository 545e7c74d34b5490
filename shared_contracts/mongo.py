"""The one way every process opens MongoDB, so all clients agree on time zones and codecs."""

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.results import DeleteResult, UpdateResult

T = TypeVar("T")


def make_client(uri: str, *, app_name: str, **kwargs: Any) -> AsyncMongoClient[dict[str, Any]]:
    # tz_aware: every datetime we read back is UTC-aware, so comparisons with now() never mix
    # naive and aware values.
    return AsyncMongoClient(uri, tz_aware=True, appname=app_name, **kwargs)


async def in_transaction(
    client: AsyncMongoClient[dict[str, Any]],
    work: Callable[[AsyncClientSession], Awaitable[T]],
) -> T:
    """Run ``work`` in one transaction; with_transaction retries transient errors and unknown
    commit results, so ``work`` must be safe to run again from the start."""
    async with client.start_session() as session:
        return await session.with_transaction(work)


# --- multi-document writes outside a caller's transaction -------------------------------------
# Every update_many / delete_many that is not part of a caller's transaction goes through these
# two (tests/test_multi_document_writes.py checks the syntax tree). The reason is the embedded
# server (tests/test_embedded_gaps.py): it retries a plain multi-document write's conflict with a
# transaction while holding the collection's lock, so the transaction can never finish and the
# server deadlocks. Inside a transaction a conflict aborts at once and with_transaction retries
# it. On mongod it costs one commitTransaction and makes the write all or nothing.


async def update_many(
    collection: AsyncCollection[dict[str, Any]],
    query: Mapping[str, Any],
    update: Mapping[str, Any],
) -> UpdateResult:
    """``collection.update_many`` in a transaction of its own."""

    async def write(session: AsyncClientSession) -> UpdateResult:
        return await collection.update_many(query, update, session=session)

    return await in_transaction(collection.database.client, write)


async def delete_many(
    collection: AsyncCollection[dict[str, Any]], query: Mapping[str, Any]
) -> DeleteResult:
    """``collection.delete_many`` in a transaction of its own."""

    async def write(session: AsyncClientSession) -> DeleteResult:
        return await collection.delete_many(query, session=session)

    return await in_transaction(collection.database.client, write)
