"""`swamp-club queue ...` and `contracts schema` as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from shared_contracts.queue.engine import Queue
from tests.queue.conftest import Job
from tests.support import DbNames

EXECUTABLE = str(Path(sys.executable).parent / "swamp-club")


async def swamp_club(mongo_uri: str, names: DbNames, *args: str) -> tuple[int, str]:
    env = {**os.environ, "MONGODB_URI": mongo_uri, "BUS_DB": names.bus}
    process = await asyncio.create_subprocess_exec(
        EXECUTABLE, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_stats_dead_retry_and_purge(jobs: Queue, mongo_uri: str, db_names: DbNames) -> None:
    await jobs.publish_many([Job(n=1), Job(n=2)])
    dead = await jobs.claim(worker="w")
    assert dead is not None
    await jobs.dead_letter(dead, ValueError("no such user"))
    done = await jobs.claim(worker="w")
    assert done is not None
    await jobs.ack(done)

    code, out = await swamp_club(mongo_uri, db_names, "queue", "stats", "--json")
    assert code == 0, out
    commands = next(q for q in json.loads(out) if q["queue"] == "telemetry_commands")
    assert commands["byStatus"] == {"pending": 0, "active": 0, "done": 1, "dead": 1}

    code, out = await swamp_club(mongo_uri, db_names, "queue", "dead", "--type", "job")
    assert code == 0, out
    assert str(dead.id) in out
    assert "ValueError: no such user" in out

    code, out = await swamp_club(mongo_uri, db_names, "queue", "retry", str(dead.id))
    assert (code, out.strip()) == (0, "1 message(s) back to pending")
    assert (await jobs.collection.find_one({"_id": dead.id}))["status"] == "pending"

    code, out = await swamp_club(mongo_uri, db_names, "queue", "purge", "--done")
    assert (code, out.strip()) == (0, "1 done message(s) deleted")

    code, out = await swamp_club(mongo_uri, db_names, "queue", "stats")
    assert code == 0
    assert out.splitlines()[0].split() == [
        "queue",
        "pending",
        "active",
        "done",
        "dead",
        "oldest",
        "pending",
    ]


async def test_usage_errors_exit_2(mongo_uri: str, db_names: DbNames) -> None:
    assert (await swamp_club(mongo_uri, db_names, "queue", "retry"))[0] == 2
    assert (await swamp_club(mongo_uri, db_names, "queue", "stats", "-q", "nope"))[0] == 2
    assert (await swamp_club(mongo_uri, db_names, "queue", "purge"))[0] == 2


async def test_contracts_schema_lists_every_message(mongo_uri: str, db_names: DbNames) -> None:
    code, out = await swamp_club(mongo_uri, db_names, "contracts", "schema")
    assert code == 0
    schemas = json.loads(out)
    assert set(schemas["telemetry_commands"]) == {
        "username_changed",
        "user_registered",
        "api_key_issued",
        "api_key_revoked",
    }
    refresh = schemas["swamp_club_events"]["score_refresh"]
    assert set(refresh["required"]) >= {"username", "reason", "projectionVersion", "snapshot"}
