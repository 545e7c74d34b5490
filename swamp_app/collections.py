"""The app's collections (SPEC section 2) and their indexes."""

from __future__ import annotations

from typing import Any, Final

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

USERS: Final = "users"  # _id = userId; username unique (kept by deleted users' tombstones)
API_KEYS: Final = "api_keys"  # _id = key id; keyHash (SHA-256) unique; raw keys are never stored
USER_SCORES: Final = "user_scores"  # _id = userId; username unique (re-keyed on rename)
MIGRATIONS: Final = "migrations"
COUNTERS: Final = "counters"  # the name clock (users/name_clock.py)

#: A user that has not been deleted (deletion keeps a tombstone with ``deletedAt``).
LIVE_USER: Final = {"deletedAt": None}


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    await db[USERS].create_index("username", unique=True, name="username")
    await db[API_KEYS].create_indexes(
        [
            IndexModel([("keyHash", ASCENDING)], unique=True, name="key_hash"),
            IndexModel([("userId", ASCENDING)], name="user_id"),
        ]
    )
    await db[USER_SCORES].create_indexes(
        [
            IndexModel([("username", ASCENDING)], unique=True, name="username"),
            IndexModel(
                [("canonicalScore", DESCENDING), ("username", ASCENDING)], name="leaderboard"
            ),
        ]
    )
