"""The compose roles cover every command the services really send at start-up, including the
collMod that applies a changed QUEUE_DONE_RETENTION_SECONDS to the TTL index."""

from __future__ import annotations

import re
from pathlib import Path

from pymongo import monitoring

from swamp_app.main import open_runtime as open_app
from swamp_app.settings import AppSettings
from telemetry_service.main import open_runtime as open_telemetry
from telemetry_service.settings import TelemetrySettings

ROOT = Path(__file__).resolve().parent.parent

#: What MongoDB's built-in roles allow (the subset of commands the services use).
READ_WRITE = {
    "find", "insert", "update", "delete", "aggregate", "getMore", "killCursors", "count",
    "distinct", "findAndModify", "createIndexes", "listIndexes", "listCollections", "create",
    "drop", "dropIndexes", "collStats",
}  # fmt: skip
DB_ADMIN = {
    "collMod", "createIndexes", "listIndexes", "listCollections", "dropIndexes", "collStats",
    "create", "drop", "validate",
}  # fmt: skip
ROLE_COMMANDS = {"readWrite": READ_WRITE, "dbAdmin": DB_ADMIN}
#: Commands that need no privilege on a database (sessions, transactions, handshakes).
ANY_USER = {"hello", "isMaster", "ping", "endSessions", "commitTransaction", "abortTransaction"}


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.on = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.on:
            self.seen.add((event.database_name, event.command_name))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def granted(user: str, names: dict[str, str]) -> dict[str, set[str]]:
    """Database -> allowed commands, from deploy/mongo-init.js for ``user`` (an env variable)."""
    script = (ROOT / "deploy" / "mongo-init.js").read_text()
    block = next(
        b for b in re.findall(r"createUser\(\{(.*?)\}\);", script, flags=re.S) if user in b
    )
    allowed: dict[str, set[str]] = {}
    for role, db in re.findall(r'\{ role: "(\w+)", db: ([^}]+?) \}', block):
        database = names["bus"] if db == "bus" else re.search(r'"(\w+)"', db).group(1)  # type: ignore[union-attr]
        allowed.setdefault(names.get(database, database), set()).update(ROLE_COMMANDS[role])
    return allowed


async def test_the_roles_cover_the_commands_the_services_send(mongo_uri: str) -> None:
    listener = Commands()
    monitoring.register(listener)  # clients created from now on report to it
    names = {"bus": "roles_bus", "telemetry": "roles_telemetry", "swamp_club": "roles_app"}
    try:
        listener.on = True
        for retention in (3600, 7200):  # the second start-up changes the TTL: collMod
            telemetry = await open_telemetry(
                TelemetrySettings(
                    MONGODB_URI=mongo_uri,
                    TELEMETRY_DB=names["telemetry"],
                    BUS_DB=names["bus"],
                    QUEUE_DONE_RETENTION_SECONDS=retention,
                )
            )
            telemetry_seen, listener.seen = listener.seen, set()
            await telemetry.client.close()
            app = await open_app(
                AppSettings(
                    MONGODB_URI=mongo_uri,
                    APP_DB=names["swamp_club"],
                    BUS_DB=names["bus"],
                    QUEUE_DONE_RETENTION_SECONDS=retention,
                )
            )
            app_seen, listener.seen = listener.seen, set()
            await app.client.close()
            for user, seen in (("TELEMETRY_DB_USER", telemetry_seen), ("APP_DB_USER", app_seen)):
                allowed = granted(user, names)
                missing = {
                    (db, command)
                    for db, command in seen
                    if command not in ANY_USER and command not in allowed.get(db, set())
                }
                assert not missing, f"{user} lacks {missing}"
            if retention == 7200:
                assert ("roles_bus", "collMod") in telemetry_seen | app_seen
    finally:
        listener.on = False
        client = telemetry.client.__class__(mongo_uri)
        for name in names.values():
            await client.drop_database(name)
        await client.close()
