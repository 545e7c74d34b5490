"""API keys as both services see them: how a key is presented and the hash that identifies it.

Raw keys are shown to their user once and stored nowhere; everything else uses the SHA-256.
"""

from __future__ import annotations

import hashlib

from shared_contracts.api_errors import Unauthorized


def api_key_hash(key: str) -> str:
    """The ``keyHash`` of api_key_issued / api_key_revoked: SHA-256, lowercase hex."""
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
