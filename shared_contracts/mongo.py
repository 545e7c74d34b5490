"""The one way every process opens MongoDB, so all clients agree on time zones and codecs."""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession

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
