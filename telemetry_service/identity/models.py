"""Stored shapes of the identity collections, for their read paths."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class IdentityEntry(BaseModel):
    """``identity_map[userId]``: the user's current name and every device it owns or has
    authenticated on."""

    userId: str
    username: str | None = Field(
        default=None, description="None until the user's newest name assignment is applied."
    )
    distinctIds: list[str] = Field(default_factory=list)

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> IdentityEntry:
        return cls.model_validate({**document, "userId": document["_id"]})


class KnownUser(BaseModel):
    """``known_users[userId]``: the app's name assignment last applied here."""

    userId: str
    username: str | None = None
    nameSeq: int = 0

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> KnownUser:
        return cls.model_validate({**document, "userId": document["_id"]})


class KnownKey(BaseModel):
    """``known_keys[sha256]``: whose key it is, and whether it was revoked."""

    keyHash: str
    userId: str | None = None
    revokedAt: datetime | None = None

    @property
    def owner(self) -> str | None:
        """The user the key authenticates, or None if it counts as no key."""
        return None if self.revokedAt is not None else self.userId

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> KnownKey:
        return cls.model_validate({**document, "keyHash": document["_id"]})
