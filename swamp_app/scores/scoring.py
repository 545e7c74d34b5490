"""The score of a user, as a pure function of its username_metrics snapshot.

    activityScore = 10 x activeDays
                  +  5 x log2(1 + successCount)
                  +  2 x min(25, distinct commands used)

Why: active days reward steady use over bursts (a loop of 10,000 calls on one day is one day);
successes count with diminishing returns, so volume helps but cannot be farmed; breadth rewards
exploring the tool, capped so it cannot dominate. Failures never subtract: a score never goes
negative and trying things is not punished. canonicalScore is the sum of scoreSources, of which
``activity`` is the first (and today the only) source; rounded to 2 decimals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

ACTIVE_DAY_POINTS = 10.0
SUCCESS_POINTS = 5.0
COMMAND_POINTS = 2.0
COMMAND_CAP = 25


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def activity_score(snapshot: Mapping[str, Any]) -> float:
    days = _count(snapshot.get("activeDays"))
    successes = _count(snapshot.get("successCount"))
    commands = snapshot.get("commandCounts")
    used = sum(1 for n in commands.values() if _count(n)) if isinstance(commands, Mapping) else 0
    score = (
        ACTIVE_DAY_POINTS * days
        + SUCCESS_POINTS * math.log2(1 + successes)
        + COMMAND_POINTS * min(COMMAND_CAP, used)
    )
    return round(score, 2)


def score_sources(snapshot: Mapping[str, Any]) -> dict[str, float]:
    """Named components of the score, ``activity`` first."""
    return {"activity": activity_score(snapshot)}


def canonical_score(sources: Mapping[str, float]) -> float:
    return round(sum(sources.values()), 2)
