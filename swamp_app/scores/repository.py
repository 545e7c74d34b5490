"""user_scores: one document per user (_id = userId, username unique), re-keyed on rename."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from shared_contracts.messages import ScoreRefresh
from swamp_app.collections import USER_SCORES
from swamp_app.scores.scoring import activity_score, canonical_score, score_sources

log = logging.getLogger(__name__)
Database = AsyncDatabase[dict[str, Any]]
Session = AsyncClientSession | None
Applied = Literal["applied", "stale", "unknown_user"]


async def create_score(db: Database, *, user_id: str, username: str, session: Session) -> None:
    """A new user's score: zeros until telemetry's first refresh (sourceVersion 0)."""
    now = datetime.now(UTC)
    await db[USER_SCORES].insert_one(
        {
            "_id": user_id,
            "username": username,
            "canonicalScore": 0.0,
            "activityScore": 0.0,
            "scoreSources": {"activity": 0.0},
            "scoreHistory": [],
            "sourceVersion": 0,
            "createdAt": now,
            "updatedAt": now,
        },
        session=session,
    )


async def rekey_score(db: Database, *, user_id: str, username: str, session: Session) -> None:
    await db[USER_SCORES].update_one(
        {"_id": user_id},
        {"$set": {"username": username, "updatedAt": datetime.now(UTC)}},
        session=session,
    )


async def delete_score(db: Database, *, user_id: str, session: Session) -> None:
    """A deleted user's score goes; later refreshes for the user find no score and are
    acknowledged as unknown."""
    await db[USER_SCORES].delete_one({"_id": user_id}, session=session)


async def apply_refresh(
    db: Database, refresh: ScoreRefresh, *, history_cap: int, session: Session
) -> Applied:
    """Re-score from the snapshot, only if its projectionVersion is newer than the one behind
    the stored score (I9): redelivery and reordering never move a score backwards.

    Addressed by userId, never by username: the name in the refresh may belong to someone else
    by now (renamed away, then taken)."""
    scores = db[USER_SCORES]
    # The version check is the update's filter: one command for the usual case (a newer
    # projection); only a refresh that changed nothing asks why.
    result = await scores.update_one(
        *_rescore(refresh, history_cap=history_cap, now=datetime.now(UTC)), session=session
    )
    if result.modified_count == 1:
        return "applied"
    known = await scores.find_one({"_id": refresh.userId}, {"_id": 1}, session=session)
    return "stale" if known else "unknown_user"


async def apply_refreshes(
    db: Database, refreshes: list[ScoreRefresh], *, history_cap: int, session: AsyncClientSession
) -> list[Applied]:
    """apply_refresh for a batch, in the caller's transaction: one read of the users' versions
    and one bulk write, whatever its size. The outcomes are in the order of ``refreshes``.

    The read is the transaction's snapshot, and each update keeps its version check: if a
    concurrent writer changed a score meanwhile, the transaction conflicts and is retried."""
    ids = sorted({r.userId for r in refreshes})
    found = db[USER_SCORES].find(
        {"_id": {"$in": ids}}, {"sourceVersion": 1}, batch_size=len(ids) + 1, session=session
    )
    versions = {d["_id"]: int(d.get("sourceVersion", 0)) async for d in found}
    newest: dict[str, ScoreRefresh] = {}  # per user, the newest refresh newer than its score
    for refresh in refreshes:
        user = refresh.userId
        floor = max(versions.get(user, 0), newest[user].projectionVersion if user in newest else 0)
        if user in versions and refresh.projectionVersion > floor:
            newest[user] = refresh
    now = datetime.now(UTC)
    updates = [UpdateOne(*_rescore(r, history_cap=history_cap, now=now)) for r in newest.values()]
    if updates:
        await db[USER_SCORES].bulk_write(updates, ordered=False, session=session)
    applied = {id(r) for r in newest.values()}
    return [
        "applied" if id(r) in applied else "stale" if r.userId in versions else "unknown_user"
        for r in refreshes
    ]


def _rescore(
    refresh: ScoreRefresh, *, history_cap: int, now: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filter and update that apply ``refresh`` to its user's score if it is newer."""
    version = refresh.projectionVersion
    sources = score_sources(refresh.snapshot)
    score = canonical_score(sources)
    entry = {
        "at": now,
        "canonicalScore": score,
        "activityScore": activity_score(refresh.snapshot),
        "reason": refresh.reason,
        "projectionVersion": version,
    }
    return (
        {"_id": refresh.userId, "sourceVersion": {"$lt": version}},
        {
            "$set": {
                "canonicalScore": score,
                "activityScore": entry["activityScore"],
                "scoreSources": sources,
                "sourceVersion": version,
                "updatedAt": now,
            },
            # Newest last, bounded: the oldest entries fall off.
            "$push": {"scoreHistory": {"$each": [entry], "$slice": -history_cap}},
        },
    )


async def read_score(db: Database, username: str) -> dict[str, Any] | None:
    return await db[USER_SCORES].find_one({"username": username})


async def leaderboard(db: Database, *, limit: int, offset: int) -> list[dict[str, Any]]:
    cursor = db[USER_SCORES].find(
        {},
        {"username": 1, "canonicalScore": 1, "activityScore": 1},
        sort=[("canonicalScore", -1), ("username", 1)],
        skip=offset,
        limit=limit,
    )
    return await cursor.to_list()
