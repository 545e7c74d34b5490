"""Request and response models of the users API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from swamp_app.usernames import Username


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: Username


class UserRename(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: Username


class UserPublic(BaseModel):
    id: str
    username: str

    @classmethod
    def of(cls, user: dict[str, Any]) -> UserPublic:
        return cls(id=user["_id"], username=user["username"])


class UserCreated(UserPublic):
    apiKey: str = Field(description="The user's first API key. Shown once, stored nowhere.")


class Whoami(UserPublic):
    authenticated: bool = True


class ApiKeyCreated(BaseModel):
    id: str
    apiKey: str = Field(description="Shown once, stored nowhere (only its SHA-256 is kept).")
    createdAt: datetime
