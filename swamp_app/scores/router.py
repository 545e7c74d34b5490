"""Scores: one user's score with its history, and the leaderboard."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from shared_contracts.api_errors import error_responses
from swamp_app.deps import RuntimeDep
from swamp_app.errors import NotFound
from swamp_app.scores.repository import leaderboard, read_score
from swamp_app.scores.schemas import Leaderboard, LeaderboardEntry, ScorePublic
from swamp_app.usernames import Username

router = APIRouter(prefix="/v1", tags=["scores"])


@router.get(
    "/users/{username}/score", response_model=ScorePublic, responses=error_responses(404, 422)
)
async def get_score(username: Username, runtime: RuntimeDep) -> ScorePublic:
    score = await read_score(runtime.db, username)
    if score is None:
        raise NotFound(f"no user {username!r}")
    return ScorePublic.of(score)


@router.get("/leaderboard", response_model=Leaderboard, responses=error_responses(422))
async def get_leaderboard(
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
) -> Leaderboard:
    """Users by canonicalScore, highest first (ties by username)."""
    rows = await leaderboard(runtime.db, limit=limit, offset=offset)
    entries = [
        LeaderboardEntry(
            rank=offset + i + 1,
            username=row["username"],
            canonicalScore=row["canonicalScore"],
            activityScore=row["activityScore"],
        )
        for i, row in enumerate(rows)
    ]
    return Leaderboard(entries=entries, limit=limit, offset=offset)
