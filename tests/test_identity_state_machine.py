"""Issue 14's state machine: users register, rename, take each other's freed names, get and
lose keys, are deleted; devices are shared; commands die and are retried late; a consumer dies
holding a claim; the backfill runs. After quiescence every user's projection equals what it is
owed under I3, every name answers with its holder's stats, every score is at its projection's
version, and verify is clean.

The model resolves an event's key when the pipeline applies it (commands are always drained
before events), exactly as I10 says: a revoked key or a deleted user's key is no key. Unless the
revoke died: a command whose worker died maxAttempts times dies on its next claim, and until an
operator retries it telemetry has not heard of the revoke, so the key is still its user's.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shared_contracts.keys import api_key_hash
from shared_contracts.mongo import make_client
from swamp_app.settings import AppSettings
from telemetry_service.backfill import Backfill
from telemetry_service.projection.verify import verify
from telemetry_service.settings import TelemetrySettings
from tests.pipeline import Pipeline, pipeline_of
from tests.support import DbNames

NAMES = ["ada", "bob", "cyd", "dee"]
DEVICES = ["d0", "d1", "d2", "d3"]


@dataclass
class User:
    id: str
    name: str
    keys: dict[str, str] = field(default_factory=dict)  # key -> key id, live keys only
    dead_keys: set[str] = field(default_factory=set)
    deleted: bool = False


@dataclass
class Model:
    users: dict[str, User] = field(default_factory=dict)
    #: Sent, not yet applied: (device, key or None, count).
    pending: list[tuple[str, str | None, int]] = field(default_factory=list)
    owner: dict[str, str] = field(default_factory=dict)  # device -> userId
    own: dict[str, int] = field(default_factory=dict)  # userId -> its authenticated events
    anonymous: dict[str, int] = field(default_factory=dict)  # device -> anonymous events
    #: Keys whose api_key_revoked dies on its next claim (its worker died maxAttempts times).
    dying: set[str] = field(default_factory=set)
    #: Keys whose api_key_revoked died: still their user's in telemetry until an operator
    #: retries the command.
    unrevoked: set[str] = field(default_factory=set)

    def taken(self, name: str) -> bool:
        return any(u.name == name for u in self.users.values())  # deleted users keep theirs

    def key_owner(self, key: str | None) -> str | None:
        for user in self.users.values():
            if key in user.keys and not user.deleted:
                return user.id
            if key in self.unrevoked and (key in user.keys or key in user.dead_keys):
                return user.id
        return None

    def apply_pending(self) -> None:
        """What the watcher does at a drain, in arrival order (I3, I10), after the commands
        (a dying revoke died there)."""
        self.unrevoked |= self.dying
        self.dying.clear()
        for device, key, count in self.pending:
            user_id = self.key_owner(key)
            if user_id is None:
                self.anonymous[device] = self.anonymous.get(device, 0) + count
            else:
                self.owner.setdefault(device, user_id)
                self.own[user_id] = self.own.get(user_id, 0) + count
        self.pending.clear()

    def owed(self, user_id: str) -> int:
        owned = sum(n for device, n in self.anonymous.items() if self.owner.get(device) == user_id)
        return self.own.get(user_id, 0) + owned


class IdentityMachine(RuleBasedStateMachine):
    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.loop = asyncio.new_event_loop()
        self.model = Model()
        self.names = DbNames.unique()
        telemetry = TelemetrySettings(
            MONGODB_URI=uri, TELEMETRY_DB=self.names.telemetry, BUS_DB=self.names.bus
        )
        app = AppSettings(MONGODB_URI=uri, APP_DB=self.names.app, BUS_DB=self.names.bus)
        self.context = pipeline_of(telemetry, app)
        self.p: Pipeline = self.run(self.context.__aenter__())

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.quiesce_and_check()
        finally:
            self.run(self.context.__aexit__(None, None, None))
            self.run(self._drop())
            self.loop.close()

    async def _drop(self) -> None:
        client = make_client(self.uri, app_name="state-machine-cleanup")
        for name in self.names.all():
            await client.drop_database(name)
        await client.close()

    def live(self) -> list[User]:
        return [u for u in self.model.users.values() if not u.deleted]

    # --- the app's users ---------------------------------------------------------------

    @initialize()
    def first_user(self) -> None:
        self.register_as("ada")

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: str) -> None:
        if self.model.taken(name):
            response = self.run(self.p.app.post("/v1/users", json={"username": name}))
            assert response.status_code == 409
            return
        self.register_as(name)

    def register_as(self, name: str) -> None:
        body = self.run(self.p.register(name))
        self.model.users[body["id"]] = User(body["id"], name, {body["apiKey"]: ""})

    @precondition(lambda self: self.live())
    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def rename(self, data: st.DataObject, name: str) -> None:
        user = data.draw(st.sampled_from(self.live()))
        response = self.run(self.p.rename(next(iter(user.keys)), name))
        if user.name != name and self.model.taken(name):
            assert response.status_code == 409
            return
        assert response.status_code == 200, response.text
        user.name = name

    @precondition(lambda self: self.live())
    @rule(data=st.data(), by_registration=st.booleans())
    def a_freed_name_is_taken_at_once(self, data: st.DataObject, by_registration: bool) -> None:
        """A renames away; the freed name is taken a moment later by a new user or another
        user's rename, both commands still pending."""
        user = data.draw(st.sampled_from(self.live()))
        free = [n for n in NAMES if not self.model.taken(n)]
        if not free:
            return
        freed = user.name
        self.rename_to(user, data.draw(st.sampled_from(free)))
        others = [u for u in self.live() if u is not user]
        if by_registration or not others:
            self.register_as(freed)
        else:
            self.rename_to(data.draw(st.sampled_from(others)), freed)

    def rename_to(self, user: User, name: str) -> None:
        response = self.run(self.p.rename(next(iter(user.keys)), name))
        assert response.status_code == 200, response.text
        user.name = name

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from(self.live()))
        self.run(self.p.delete(next(iter(user.keys))))
        user.deleted = True

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def issue_key(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from(self.live()))
        created = self.run(self.p.new_key(next(iter(user.keys))))
        user.keys[created["apiKey"]] = created["id"]

    @precondition(lambda self: any(len(u.keys) > 1 for u in self.live()))
    @rule(data=st.data())
    def revoke_key(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from([u for u in self.live() if len(u.keys) > 1]))
        key = data.draw(st.sampled_from(sorted(k for k, kid in user.keys.items() if kid)))
        self.run(self.p.revoke(next(k for k in user.keys if k != key), user.keys.pop(key)))
        user.dead_keys.add(key)

    # --- the CLI -----------------------------------------------------------------------

    @rule(data=st.data(), device=st.sampled_from(DEVICES), count=st.integers(1, 3))
    def send(self, data: st.DataObject, device: str, count: int) -> None:
        keys = sorted(k for u in self.model.users.values() for k in (*u.keys, *u.dead_keys))
        key = data.draw(st.one_of(st.none(), st.sampled_from(keys)) if keys else st.none())
        self.run(self.p.send(device, key, count=count))
        self.model.pending.append((device, key, count))

    # --- the unlucky scheduler and the operator -----------------------------------------

    @rule()
    def drain(self) -> None:
        self.run(self.p.drain())
        self.model.apply_pending()

    @rule(data=st.data())
    def drain_with_some_renames_late(self, data: st.DataObject) -> None:
        """Commands of different users are applied in any order: some renames arrive after
        everything published later (key commands are never held: keys are tested apart)."""

        async def pending_renames() -> list[Any]:
            found = self.p.commands.find(
                {"status": "pending", "type": "username_changed"}, {"_id": 1}
            )
            return [d["_id"] async for d in found]

        ids = self.run(pending_renames())
        late = data.draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
        if late:
            self.run(self.p.hold_commands(_id={"$in": late}))
        self.drain()
        self.run(self.p.release_commands())

    @rule()
    def rename_commands_die(self) -> None:
        self.run(self.p.dead_letter_commands(type="username_changed"))

    @rule()
    def operator_retries_dead_commands(self) -> None:
        self.run(self.p.retry_dead_commands())
        self.model.unrevoked.clear()  # the next drain applies the revokes before any event

    @rule()
    def a_consumer_dies_holding_a_claim(self) -> None:
        async def crash_and_recover() -> None:
            queue = self.p.telemetry_runtime.commands
            claim = await queue.claim(worker="doomed")
            if claim is None:
                return
            if claim.attempts >= claim.max_attempts and claim.document["type"] == "api_key_revoked":
                self.model.dying.update(  # its next claim finds it past its attempts: dead
                    key
                    for user in self.model.users.values()
                    for key in (*user.keys, *user.dead_keys)
                    if api_key_hash(key) == claim.document["keyHash"]
                )
            await queue.collection.update_one(
                {"_id": claim.id}, {"$set": {"leaseUntil": datetime.now(UTC) - timedelta(1)}}
            )
            await queue.reap()

        self.run(crash_and_recover())

    @rule()
    def backfill(self) -> None:
        async def run_again() -> None:
            job = Backfill(self.p.telemetry_runtime, owner=uuid.uuid4().hex)
            await job.reset()
            assert await job.run_if_needed()

        self.run(run_again())

    # --- after quiescence --------------------------------------------------------------

    def quiesce_and_check(self) -> None:
        """Drain; an operator retries what died (a command whose worker died maxAttempts
        times dies on its next claim), until nothing is dead."""
        self.drain()
        for _ in range(3):
            if not self.run(self.p.retry_dead_commands()):
                break
            self.model.unrevoked.clear()
            self.drain()
        self.run(self.check())

    async def check(self) -> None:
        p = self.p
        for user in self.model.users.values():
            projection = await p.projection(user.id)
            assert projection is not None, user
            assert projection["totalInvocations"] == self.model.owed(user.id), user
            assert projection.get("username") == user.name, user
            if not user.deleted:
                stats = await p.stats(user.name)
                assert stats is not None
                assert stats["userId"] == user.id
                score = await p.stored_score(user.id)
                assert score is not None
                assert score["sourceVersion"] == projection["projectionVersion"], user
        report = await verify(p.telemetry_runtime.db, p.telemetry_runtime.bus)
        assert report.clean, report.as_dict()


@pytest.mark.slow
def test_identity_state_machine(mongo_uri: str) -> None:
    run_state_machine_as_test(
        lambda: IdentityMachine(mongo_uri),
        settings=settings(
            max_examples=15,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
