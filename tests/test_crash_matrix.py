"""Crash matrix: a real `swamp-club up` SIGKILLs itself at each failpoint, restarts, drains.

After each: every accepted event counted exactly once (I2), `telemetry verify` clean (I4),
every score at its projection's version (I1, I9), no queue message left active.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from swamp_club.embedded_db import EmbeddedDb, free_port
from telemetry_service.processing.progress import UNAPPLIED_ASIDE, unapplied_query
from tests.support import EMBEDDED, DbNames, LoggedProcess
from tests.telemetry.conftest import cli_event
from tests.telemetry.test_backfill import bucket
from tests.test_cli_up import wait_ready
from tests.test_end_to_end import FAST, wait_for

EXECUTABLE = str(Path(sys.executable).parent / "swamp-club")

# Part of `make test` on both servers. SWAMP_CRASH_MATRIX=0 skips it for quick local runs (it
# adds about 80 s: each crash leaves a transaction open until the server's 60 s lifetime limit).
# It found that SecantusDB aborts such a transaction only when a transactional statement
# arrives: a restarted watcher's claim (a plain write) could wait on it forever, and once the
# clean-up's dropDatabase spun forever and stalled the suite (tests/test_embedded_gaps.py; the
# launcher's TransactionReaper now stands in). On the embedded database the matrix runs on a
# server of its own (see matrix_uri), every process is stopped before clean-up, and the client
# timeouts turn any stall into a failure.
pytestmark = pytest.mark.skipif(
    os.environ.get("SWAMP_CRASH_MATRIX") == "0",
    reason="SWAMP_CRASH_MATRIX=0: process-level crash matrix skipped on request",
)
LOG_DIR = Path(".")  # set by the test to its tmp_path
#: A crashed transaction holds its documents for up to 60 s (the server's lifetime limit), then
#: the leases expire and the work is redone: allow for both on a loaded machine.
SETTLE_SECONDS = 180
CRASH_EXIT_CODE = -signal.SIGKILL  # how Popen reports death by SIGKILL


#: Every `up` a scenario starts, so the test can stop what a failed scenario left running before
#: it drops the databases or stops the server: a process still writing while its database is
#: dropped livelocks the embedded server (a plain write and the drop keep conflicting).
STARTED: list[Up] = []


class Up:
    def __init__(
        self,
        mongo_uri: str,
        names: DbNames,
        failpoint: str | None = None,
        *,
        dies_at_start_up: bool = False,
    ) -> None:
        self.ports = {"telemetry": free_port(), "app": free_port()}
        self.env = {
            **os.environ,
            **FAST,
            "MONGODB_URI": mongo_uri,
            "TELEMETRY_DB": names.telemetry,
            "APP_DB": names.app,
            "BUS_DB": names.bus,
            "TELEMETRY_PORT": str(self.ports["telemetry"]),
            "APP_PORT": str(self.ports["app"]),
            "BACKFILL_BATCH_SIZE": "5",
            # A crashed process's claims are retried after their leases: keep them short here.
            "INGEST_LEASE_SECONDS": "2",
            "QUEUE_LEASE_SECONDS": "2",
            "BACKFILL_LEASE_SECONDS": "2",
            # Requests after a crash must outwait the crashed transaction (held until the server
            # reaps it, up to 60 s): no per-request budget here. With one, the rename is a 503
            # after 10 s, and on the embedded server a re-sent ingest carrying maxTimeMS waited
            # on the orphan past the client's 30 s (not reduced yet; the outage behaviour has its
            # own test, tests/test_outages.py).
            "REQUEST_DB_TIMEOUT_SECONDS": "0",
        }
        if failpoint:
            self.env["SWAMP_FAILPOINTS"] = f"{failpoint}=kill"
        log = LOG_DIR / f"{names.telemetry}-{failpoint or 'plain'}-{uuid.uuid4().hex[:6]}.log"
        self.names = names
        self.process = LoggedProcess([EXECUTABLE, "up"], env=self.env, log=log)
        STARTED.append(self)
        self.telemetry = f"http://127.0.0.1:{self.ports['telemetry']}"
        self.app = f"http://127.0.0.1:{self.ports['app']}"
        if not dies_at_start_up:
            wait_ready(f"{self.telemetry}/healthz", self.process)
            wait_ready(f"{self.app}/healthz", self.process)

    def crashed(self) -> bool:
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return False
        return self.process.returncode == CRASH_EXIT_CODE

    def ingest(self, body: Any, key: str | None = None) -> int:
        try:
            headers = {"x-api-key": key} if key else {}
            return httpx.post(
                f"{self.telemetry}/ingest", json=body, headers=headers, timeout=30
            ).status_code
        except httpx.TransportError:
            return 0  # the process is gone: not accepted


def settled(client: MongoClient[dict[str, Any]], names: DbNames) -> bool:
    """Read in the order work flows: the commands, then the events and the backfill, the score
    refreshes they publish last. A batch that commits between two reads has published its
    refresh in its transaction, before the last read: read the other way round, the refreshes
    counted none, the batch committed, and the probe said settled with one pending."""
    bus, tele = client[names.bus], client[names.telemetry]

    def busy(queue: str) -> bool:
        return bus[queue].count_documents({"status": {"$in": ["pending", "active"]}}) > 0

    if busy("telemetry_commands"):
        return False
    marker = tele.migrations.find_one({"_id": "username_metrics_backfill"}) or {}
    if (
        tele.events.count_documents(unapplied_query(tele.ingest_progress.find_one()))
        or tele.events_aside.count_documents(UNAPPLIED_ASIDE)
        or marker.get("status") != "done"
    ):
        return False
    return not busy("swamp_club_events")


def assert_invariants(
    client: MongoClient[dict[str, Any]], names: DbNames, env: dict[str, str]
) -> None:
    verify = subprocess.run(
        [EXECUTABLE, "telemetry", "verify"], env=env, capture_output=True, text=True, check=False
    )
    assert (verify.returncode, verify.stdout.splitlines()[0]) == (0, "no drift"), verify.stdout
    projections = {
        p["_id"]: p["projectionVersion"] for p in client[names.telemetry].username_metrics.find()
    }
    for score in client[names.app].user_scores.find():
        if score["_id"] in projections:
            assert score["sourceVersion"] == projections[score["_id"]], score["username"]
    for queue in ("swamp_club_events", "telemetry_commands"):
        assert (
            client[names.bus][queue].count_documents({"status": {"$in": ["active", "dead"]}}) == 0
        )


def register(up: Up, username: str) -> str:
    key: str = httpx.post(f"{up.app}/v1/users", json={"username": username}).json()["apiKey"]
    wait_for(lambda: up.ingest(cli_event("owned-dev"), key) == 202)  # owns the device
    wait_for(
        lambda: (
            httpx.get(f"{up.telemetry}/v1/stats", params={"username": username})
            .json()
            .get("totalInvocations")
            == 1
        )
    )
    return key


def crash_while_applying_events(mongo_uri: str, db_names: DbNames, failpoint: str) -> None:
    first = Up(mongo_uri, db_names)
    key = register(first, "crash-user")
    first.process.stop()

    crashing = Up(mongo_uri, db_names, failpoint)
    batches = [
        ({"events": [cli_event("owned-dev") for _ in range(25)]}, key),
        ({"events": [cli_event("owned-dev") for _ in range(25)]}, None),
    ]
    unacknowledged = [(body, k) for body, k in batches if crashing.ingest(body, k) != 202]
    assert len(unacknowledged) < len(batches)
    assert crashing.crashed()

    again = Up(mongo_uri, db_names)
    try:
        with MongoClient(mongo_uri, tz_aware=True, socketTimeoutMS=30_000) as client:
            # As the CLI does: anything that got no 202 is sent again with the same ids, on
            # every later run until it gets one. The first tries may wait on (or time out
            # behind) the killed process's transaction, which holds its documents until the
            # server aborts it, up to a minute later (README, "Recovery after a hard crash").
            for body, k in unacknowledged:
                wait_for(lambda body=body, k=k: again.ingest(body, k) == 202, within=150)
            wait_for(lambda: settled(client, db_names), within=SETTLE_SECONDS)
            stats = httpx.get(
                f"{again.telemetry}/v1/stats", params={"username": "crash-user"}
            ).json()
            assert stats["totalInvocations"] == 1 + 50  # every event exactly once
            assert_invariants(client, db_names, again.env)
    finally:
        again.process.stop()


def crash_after_storing_before_the_202(mongo_uri: str, db_names: DbNames) -> None:
    first = Up(mongo_uri, db_names)
    key = register(first, "crash-user")
    first.process.stop()

    crashing = Up(mongo_uri, db_names, "ingest.before_reply")
    batch = {"events": [cli_event("owned-dev") for _ in range(25)]}
    assert crashing.ingest(batch, key) == 0  # stored, then killed before answering
    assert crashing.crashed()

    again = Up(mongo_uri, db_names)
    try:
        with MongoClient(mongo_uri, tz_aware=True, socketTimeoutMS=30_000) as client:
            resent = httpx.post(
                f"{again.telemetry}/ingest", json=batch, headers={"x-api-key": key}, timeout=30
            )
            assert (resent.status_code, resent.json()) == (202, {"accepted": 0, "duplicates": 25})
            wait_for(lambda: settled(client, db_names), within=SETTLE_SECONDS)
            stats = httpx.get(
                f"{again.telemetry}/v1/stats", params={"username": "crash-user"}
            ).json()
            assert stats["totalInvocations"] == 1 + 25
            assert_invariants(client, db_names, again.env)
    finally:
        again.process.stop()


def crash_after_the_app_s_user_update(mongo_uri: str, db_names: DbNames) -> None:
    crashing = Up(mongo_uri, db_names, "app.after_user_update")
    key = register(crashing, "before-crash")
    with pytest.raises(httpx.TransportError):
        httpx.patch(f"{crashing.app}/v1/users/me", json={"username": "after-crash"},
                    headers={"Authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    assert crashing.crashed()

    again = Up(mongo_uri, db_names)
    try:
        with MongoClient(mongo_uri, tz_aware=True, socketTimeoutMS=30_000) as client:
            app = client[db_names.app]
            assert app.users.find_one({"username": "before-crash"}) is not None  # nothing committed
            assert app.user_scores.find_one({"username": "before-crash"}) is not None
            assert (
                client[db_names.bus].telemetry_commands.count_documents(
                    {"type": "username_changed"}
                )
                == 0
            )
            renamed = httpx.patch(
                f"{again.app}/v1/users/me",
                json={"username": "after-crash"},
                headers={"Authorization": f"Bearer {key}"},
                # The crashed rename's transaction holds the user until the server reaps it.
                timeout=90,
            )
            assert renamed.status_code == 200
            wait_for(
                lambda: (
                    httpx.get(
                        f"{again.telemetry}/v1/stats", params={"username": "after-crash"}
                    ).status_code
                    == 200
                )
            )
            wait_for(lambda: settled(client, db_names), within=SETTLE_SECONDS)
            assert_invariants(client, db_names, again.env)
    finally:
        again.process.stop()


def crash_in_the_middle_of_the_backfill(mongo_uri: str, db_names: DbNames) -> None:
    with MongoClient(mongo_uri, tz_aware=True, socketTimeoutMS=30_000) as client:
        tele = client[db_names.telemetry]
        for i in range(12):
            tele.user_metrics.insert_one(
                {"_id": f"bf-dev-{i}", "ownerUserId": f"bf{i}", "anon": bucket(3)}
            )
            tele.identity_map.insert_one(
                {"_id": f"bf{i}", "username": f"bf-user-{i:02d}", "distinctIds": [f"bf-dev-{i}"]}
            )
            tele.username_metrics.insert_one(
                {"_id": f"bf{i}", "username": f"bf-user-{i:02d}", "projectionVersion": 3}
            )
            tele.known_users.insert_one(
                {"_id": f"bf{i}", "username": f"bf-user-{i:02d}", "nameSeq": i}
            )
        tele.migrations.insert_one({"_id": "identity_by_user_id", "status": "done"})
        # The backfill runs at start-up and may crash before the health check answers.
        crashing = Up(mongo_uri, db_names, "backfill.after_batch", dies_at_start_up=True)
        assert crashing.crashed()
        assert tele.migrations.find_one({"_id": "username_metrics_backfill"})["batches"] == 1
        again = Up(mongo_uri, db_names)
        try:
            wait_for(lambda: settled(client, db_names), within=SETTLE_SECONDS)
            versions = {p["projectionVersion"] for p in tele.username_metrics.find()}
            assert versions == {4}  # one write per username: the committed batch was not redone
            assert_invariants(client, db_names, again.env)
        finally:
            again.process.stop()


SCENARIOS: dict[str, Callable[[str, DbNames], None]] = {
    **{
        point: functools.partial(crash_while_applying_events, failpoint=point)
        for point in (
            "ingest.after_metrics_write",
            "ingest.before_mark_processed",
            "ingest.before_commit",
        )
    },
    "ingest.before_reply": crash_after_storing_before_the_202,
    "app.after_user_update": crash_after_the_app_s_user_update,
    "backfill.after_batch": crash_in_the_middle_of_the_backfill,
}


@pytest.fixture
def matrix_uri(tmp_path: Path) -> Iterator[str]:
    """MONGODB_URI, or a server of the matrix's own on the embedded database.

    What the crashes leave behind must not reach other tests: on the shared embedded server the
    load test that ran next stalled for up to 20 s, every writer asleep inside WiredTiger's
    page-in (py-spy), even 75 s after the matrix ended (README, "The embedded database").
    """
    if uri := os.environ.get("MONGODB_URI"):
        yield uri
        return
    with EmbeddedDb(log_path=tmp_path / "embedded-db.log") as db:
        yield db.uri


def test_the_crash_matrix(matrix_uri: str, tmp_path: Path) -> None:
    """All failpoints at once, each with its own databases: a crash inside a transaction leaves
    it open on the server until transactionLifetimeLimitSeconds (60 s), so run side by side the
    waits overlap instead of adding up."""
    global LOG_DIR
    LOG_DIR = tmp_path
    names = {point: DbNames.unique() for point in SCENARIOS}
    failures = {}
    try:
        with ThreadPoolExecutor(max_workers=len(SCENARIOS)) as pool:
            futures = {
                point: pool.submit(scenario, matrix_uri, names[point])
                for point, scenario in SCENARIOS.items()
            }
            for point, future in futures.items():
                try:
                    future.result()
                except Exception as exc:  # collect every failing failpoint, not just the first
                    failures[point] = f"{type(exc).__name__}: {exc}"
    finally:
        # What a failed scenario left running: Ctrl-C first, so that no transaction of ours is
        # left open on the server; SIGKILL only if it hangs.
        for up in STARTED:
            if up.process.poll() is None:
                up.process.interrupt(grace=30)
        # A drop waits out the crashed transactions (up to 60 s); the matrix's own embedded
        # server keeps its databases in memory, which vanish with it, so skip the wait there.
        if not EMBEDDED:
            with MongoClient(matrix_uri, socketTimeoutMS=120_000) as client:
                for db_set in names.values():
                    for name in db_set.all():
                        client.drop_database(name)
    logs = {
        point: [
            u.process.output(2000) for u in STARTED if names[point].telemetry in str(u.process.log)
        ]
        for point in failures
    }
    assert failures == {}, logs
