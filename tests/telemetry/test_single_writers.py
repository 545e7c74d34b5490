"""Each telemetry collection has one writer, checked on the syntax tree (not on text): a write
method called on ``db[NAME]`` for a collection constant (or ``mongo.update_many(db[NAME], ...)``),
anywhere else, fails this test.

- user_metrics: telemetry_service/devices/
- identity_map, known_users, known_keys: telemetry_service/identity/
- username_metrics: telemetry_service/projection/writer.py (I1: it also publishes the refresh)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "telemetry_service"

WRITERS = {
    "USER_METRICS": "telemetry_service/devices/",
    "IDENTITY_MAP": "telemetry_service/identity/",
    "KNOWN_USERS": "telemetry_service/identity/",
    "KNOWN_KEYS": "telemetry_service/identity/",
    "USERNAME_METRICS": "telemetry_service/projection/writer.py",
}
WRITE_METHODS = {
    "insert_one",
    "insert_many",
    "update_one",
    "update_many",
    "replace_one",
    "delete_one",
    "delete_many",
    "update_all",  # shared_contracts.mongo's
    "delete_all",
    "bulk_write",
    "find_one_and_update",
    "find_one_and_replace",
    "find_one_and_delete",
    "drop",
    "rename",
}
NAMES = {name: name.lower() for name in WRITERS}


def collection_written(call: ast.Call) -> str | None:
    """``x[USER_METRICS].update_one(...)`` or ``x["user_metrics"].update_one(...)`` -> the
    constant's name; anything else -> None."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr in WRITE_METHODS):
        return None
    target = func.value
    if isinstance(target, ast.Name) and target.id == "mongo" and call.args:
        target = call.args[0]  # mongo.update_many(db[NAME], ...): shared_contracts/mongo.py
    if not isinstance(target, ast.Subscript):
        return None
    key = target.slice
    if isinstance(key, ast.Name) and key.id in WRITERS:
        return key.id
    if isinstance(key, ast.Attribute) and key.attr in WRITERS:
        return key.attr
    if isinstance(key, ast.Constant) and key.value in NAMES.values():
        return next(name for name, value in NAMES.items() if value == key.value)
    return None


def writes_in(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and (name := collection_written(node)):
            found.append((node.lineno, name))
    return found


def test_every_collection_is_written_only_by_its_home() -> None:
    offenders = []
    seen = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).as_posix()
        for line, name in writes_in(path.read_text()):
            seen.add(name)
            if not relative.startswith(WRITERS[name]):
                offenders.append(f"{relative}:{line} writes {name}")
    assert offenders == []
    assert seen == set(WRITERS)  # the check looks at real writes: each home has some


@pytest.mark.parametrize(
    "source",
    [
        "await db[USER_METRICS].update_one({}, {})",
        "await self.runtime.db[collections.IDENTITY_MAP].bulk_write([])",
        'await db["username_metrics"].insert_one({})',
        "db[KNOWN_KEYS].delete_many({})",
        "await mongo.update_many(db[KNOWN_USERS], {}, {})",
    ],
)
def test_the_check_sees_a_write(source: str) -> None:
    assert writes_in(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "await db[USER_METRICS].find_one({})",
        "await db[EVENTS].update_many({}, {})",
        "cursor = db[USERNAME_METRICS].find({})",
    ],
)
def test_the_check_ignores_reads_and_other_collections(source: str) -> None:
    assert writes_in(source) == []
