"""Response models of the score API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ScoreHistoryEntry(BaseModel):
    at: datetime
    canonicalScore: float
    activityScore: float
    reason: str
    projectionVersion: int


class ScorePublic(BaseModel):
    username: str
    canonicalScore: float = Field(description="The sum of scoreSources.")
    activityScore: float
    scoreSources: dict[str, float] = Field(description="Named components, activity first.")
    scoreHistory: list[ScoreHistoryEntry] = Field(description="Newest last, bounded.")
    sourceVersion: int = Field(description="The projectionVersion behind this score.")
    updatedAt: datetime

    @classmethod
    def of(cls, document: dict[str, Any]) -> ScorePublic:
        return cls.model_validate(document)


class LeaderboardEntry(BaseModel):
    rank: int
    username: str
    canonicalScore: float
    activityScore: float


class Leaderboard(BaseModel):
    entries: list[LeaderboardEntry]
    limit: int
    offset: int
