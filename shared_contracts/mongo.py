"""The one way every process opens MongoDB, so all clients agree on time zones and codecs."""

from typing import Any

from pymongo import AsyncMongoClient


def make_client(uri: str, *, app_name: str, **kwargs: Any) -> AsyncMongoClient[dict[str, Any]]:
    # tz_aware: every datetime we read back is UTC-aware, so comparisons with now() never mix
    # naive and aware values.
    return AsyncMongoClient(uri, tz_aware=True, appname=app_name, **kwargs)
