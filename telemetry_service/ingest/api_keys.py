"""Resolve the CLI's API key to a userId through known_keys (replicated from the app).

Only the SHA-256 is stored or looked up; the key itself is never logged or kept.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from telemetry_service.collections import KNOWN_KEYS
from telemetry_service.errors import Unauthorized


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """x-api-key (current CLIs) wins over Authorization: Bearer (builds before March 2026)."""
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        raise Unauthorized("the Authorization header must be 'Bearer <api key>'")
    return None


async def resolve_user_id(db: AsyncDatabase[dict[str, Any]], key: str | None) -> str | None:
    """None for an anonymous request; 401 for a key we do not know or that was revoked."""
    if key is None:
        return None
    # The lookup is by hash, so no comparison of secrets happens in our code at all.
    known = await db[KNOWN_KEYS].find_one({"_id": key_hash(key)})
    if known is None or known.get("revokedAt") is not None or not known.get("userId"):
        raise Unauthorized("unknown or revoked API key")
    return str(known["userId"])
