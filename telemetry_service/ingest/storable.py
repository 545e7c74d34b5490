"""Can MongoDB store this raw event exactly as the CLI sent it?

We keep each event's raw JSON (unknown properties included, for newer CLIs), so JSON that BSON
cannot represent must be refused up front with a 422 naming the field, not discovered by the
driver or the server halfway through an insert (a 500, and on mongod a partly stored batch).
"""

from __future__ import annotations

from typing import Any

#: mongod refuses documents nested deeper than 100 levels; the CLI sends about 4. The event is
#: stored one level down (``raw``), and 32 leaves a wide margin for newer CLIs.
MAX_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _has_surrogate(text: str) -> bool:
    # JSON may escape lone UTF-16 surrogates ("\ud800"); BSON strings must be valid UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _problem(value: Any) -> str | None:
    if isinstance(value, str) and _has_surrogate(value):
        return "a string with an unpaired UTF-16 surrogate is not valid UTF-8"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and not INT64_MIN <= value <= INT64_MAX:
        return "an integer outside the 64-bit range"
    return None


#: Field names of a DBRef: the driver reads an object holding ``$ref`` and ``$id`` back as a
#: ``DBRef``, not the object sent, which then fails re-validation. The CLI never sends them, so
#: all three are refused anywhere. Other ``$`` names (the CLI's own ``$repo_id``, a newer CLI's)
#: are stored and read back unchanged: MongoDB 5.0+ stores them as sent on insert.
DBREF_FIELDS = frozenset({"$ref", "$id", "$db"})


def _key_problem(key: str) -> str | None:
    if key in DBREF_FIELDS:
        return f"a field named {key} (reserved for DBRefs: it would not read back as sent)"
    if "\x00" in key:
        return "a field name with a NUL character"
    if _has_surrogate(key):
        return "a field name with an unpaired UTF-16 surrogate"
    return None


def unstorable(event: Any) -> tuple[str, str] | None:
    """The first part of ``event`` BSON cannot hold, as (path, reason); None if all is well.

    Iterative, so a hostile nesting depth cannot exhaust Python's stack.
    """
    stack: list[tuple[str, Any, int]] = [("", event, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path, f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            for key, child in value.items():
                child_path = f"{path}.{key}".lstrip(".")
                if reason := _key_problem(key):
                    return child_path, reason
                stack.append((child_path, child, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", child, depth + 1) for i, child in enumerate(value))
        elif reason := _problem(value):
            return path, reason
    return None
