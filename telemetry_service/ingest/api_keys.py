"""Resolve the CLI's API key to a userId through known_keys (replicated from the app).

Only the SHA-256 is stored or looked up; the key itself is never logged or kept.
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.keys import api_key_hash
from telemetry_service.collections import KNOWN_KEYS
from telemetry_service.errors import Unauthorized


async def resolve_user_id(db: AsyncDatabase[dict[str, Any]], key: str | None) -> str | None:
    """None for an anonymous request; 401 for a key we do not know or that was revoked."""
    if key is None:
        return None
    # The lookup is by hash, so no comparison of secrets happens in our code at all.
    known = await db[KNOWN_KEYS].find_one({"_id": api_key_hash(key)})
    if known is None or known.get("revokedAt") is not None or not known.get("userId"):
        raise Unauthorized("unknown or revoked API key")
    return str(known["userId"])
