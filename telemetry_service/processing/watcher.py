"""The ingest watcher: applies batches of raw events exactly once (I2).

Two lines feed it. The main line reads events in arrival order above a high-water mark
(processing/progress.py): no event is written after its insert, the mark moves in the batch's
transaction. Events the main line cannot apply now are copied aside (processing/aside.py, in
the transaction that moves the mark past them) and claimed there one batch at a time with a
per-event lease: those waiting for their key, those behind them on a device without an owner,
those of a batch that failed (isolated there by splitting, I11), and those an older release
kept aside.

A batch is applied in ONE transaction:
1. each event's key is resolved now, not when it arrived (I10): key hash -> userId. A key
   telemetry does not know yet waits (that event alone, aside, retried shortly, for up to
   KEY_RESOLVE_GRACE_SECONDS); a revoked key, or one still unknown after that, counts as no key;
2. device buckets and ownership (devices/, I3);
3. the devices of each user (identity/);
4. the projection of every affected user through the projection writer (which publishes the
   refreshes, I1);
5. the batch's progress: the main line's mark, conditioned on the mark it read, or the copies
   aside marked processed, filtered on the claim token. If another worker got there first, that
   step matches nothing and the whole transaction aborts, so nothing is ever counted twice,
   wherever a worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import ConnectionFailure, ExecutionTimeout, PyMongoError, WTimeoutError

from shared_contracts import failpoints, mongo
from shared_contracts.messages import RefreshReason, score_refresh_key
from shared_contracts.mongo import in_transaction
from shared_contracts.queue.documents import PARKED
from shared_contracts.queue.engine import LeaseLost
from shared_contracts.wakeup import Wakeup
from telemetry_service import counters
from telemetry_service.collections import EVENTS, EVENTS_ASIDE, UNCLAIMED, update_by_ids
from telemetry_service.devices.store import (
    AttributedEvent,
    DeviceWrite,
    apply_events,
    load_owners,
)
from telemetry_service.identity.keys import known_keys
from telemetry_service.identity.models import KnownKey
from telemetry_service.identity.store import bind_devices
from telemetry_service.ingest.schemas import CliEvent
from telemetry_service.processing import aside as events_aside
from telemetry_service.processing import progress as main_line
from telemetry_service.processing.bursts import BurstWatch
from telemetry_service.projection.writer import write_projections
from telemetry_service.runtime import TelemetryRuntime

log = logging.getLogger(__name__)

#: Failpoint names, in the order the batch passes them.
AFTER_METRICS_WRITE = "ingest.after_metrics_write"
BEFORE_MARK_PROCESSED = "ingest.before_mark_processed"
BEFORE_COMMIT = "ingest.before_commit"

KeyOutcome = Literal["user", "no_key", "revoked", "unknown", "waiting"]

#: Claims of an event that died without applying it, before it is claimed alone (claim_batch).
CRASH_LOOP_ATTEMPTS = 3
#: Claims of a batch that died, after which a failure of any kind splits it (_apply_isolating).
SPLIT_AFTER_ATTEMPTS = 2
#: How long a stopping watcher tries to hand the main line on before leaving it to expire.
LET_GO_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: str
    event: CliEvent
    key_hash: str | None
    #: Events stored before keys were resolved at apply time carry the userId resolved then.
    legacy_user_id: str | None
    received_at: datetime
    #: The server's arrival sequence (ingest/arrival.py).
    arrival: int
    #: As stored: what a main-line event that must wait is copied aside from.
    document: dict[str, Any] = field(compare=False, repr=False)

    @property
    def device(self) -> str:
        return self.event.distinct_id

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> StoredEvent:
        return cls(
            id=document["_id"],
            event=CliEvent.model_validate(document["raw"]),
            key_hash=document.get("keyHash"),
            legacy_user_id=document.get("userId"),
            received_at=document["receivedAt"],
            arrival=int(document.get("seq", 0)),
            document=document,
        )


def resolve_key(
    event: StoredEvent, keys: dict[str, KnownKey], *, now: datetime, grace: timedelta
) -> tuple[KeyOutcome, str | None]:
    """Whose event this is, decided now (I10). ``waiting``: not decidable yet."""
    if event.key_hash is None:
        return ("user", event.legacy_user_id) if event.legacy_user_id else ("no_key", None)
    key = keys.get(event.key_hash)
    if key is not None and key.owner is not None:
        return "user", key.owner
    if key is not None and key.revokedAt is not None:
        return "revoked", None
    if now - event.received_at < grace:
        return "waiting", None
    return "unknown", None


@dataclass(frozen=True, slots=True)
class Attribution:
    """A batch split by what its keys resolved to."""

    ready: list[AttributedEvent]
    waiting: list[StoredEvent]
    #: Event id -> why its key counted as no key (revoked, unknown): verify lists them.
    unattributed: dict[str, str]


def attribute(
    batch: list[StoredEvent], keys: dict[str, KnownKey], *, now: datetime, grace: timedelta
) -> Attribution:
    ready: list[AttributedEvent] = []
    waiting: list[StoredEvent] = []
    unattributed: dict[str, str] = {}
    for event in batch:
        outcome, user_id = resolve_key(event, keys, now=now, grace=grace)
        counters.KEY_RESOLUTIONS.labels(outcome).inc()
        if outcome == "waiting":
            waiting.append(event)
            continue
        if outcome in ("revoked", "unknown"):
            unattributed[event.id] = outcome
        ready.append(
            AttributedEvent(event.id, event.event, user_id, event.received_at, event.arrival)
        )
    return Attribution(ready=ready, waiting=waiting, unattributed=unattributed)


def behind_a_waiting_key(split: Attribution, owners: dict[str, str]) -> set[str]:
    """Authenticated events that must wait too: on a device with no owner yet, an earlier
    event whose key is not known yet may be the one that makes its user the owner (I3: the
    first authenticated event to arrive, not the first whose key was known)."""
    first_waiting: dict[str, int] = {}
    for event in split.waiting:
        if event.device not in owners:
            first_waiting[event.device] = min(
                first_waiting.get(event.device, event.arrival), event.arrival
            )
    return {
        e.id
        for e in split.ready
        if e.user_id is not None
        and e.device in first_waiting
        and e.arrival > first_waiting[e.device]
    }


class Finish(Protocol):
    """The last write of a batch's transaction: records its progress, or raises LeaseLost."""

    async def __call__(self, session: AsyncClientSession, ready: list[AttributedEvent]) -> None: ...


class IngestWatcher:
    def __init__(self, runtime: TelemetryRuntime, *, worker: str | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.events = runtime.db[EVENTS]
        self.aside = runtime.db[EVENTS_ASIDE]
        self.refreshes = runtime.refreshes
        self.worker = worker or uuid.uuid4().hex[:8]
        self.wakeup = Wakeup(
            self.events,
            [{"$match": {"operationType": "insert"}}],
            poll_interval_seconds=self.settings.ingest_poll_interval_seconds,
            use_change_streams=self.settings.queue_change_streams,
        )
        self._stopping = asyncio.Event()
        #: Holes in the arrival sequence (by first number) -> when this worker first saw them.
        self._holes_seen: dict[int, float] = {}
        #: When events aside were last looked for (the main line looks every batch).
        self._aside_looked = -float("inf")
        #: Another replica held the main line at this worker's last try.
        self._lease_elsewhere = False
        self.bursts = BurstWatch(
            events_per_second=self.settings.score_refresh_burst_events_per_second
        )

    def stop(self) -> None:
        self._stopping.set()
        self.wakeup.set()

    async def run(self) -> None:
        watcher = asyncio.create_task(self.wakeup.watch_forever())
        try:
            while not self._stopping.is_set():
                self.wakeup.clear()
                try:
                    handled = await self.process_one_batch(aside_always=False)
                except Exception:
                    log.exception("ingest batch failed; its events are retried")
                    counters.BATCHES.labels("failed").inc()
                    handled = 0
                if not handled:
                    await self._idle()
                else:
                    await self._linger()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            # Stopped after a batch (in its linger, or cancelled in one), the main line would
            # stay ours until the lease ran out, and the replica replacing us would wait that
            # long. Best effort, bounded so that a database gone away does not hold up the
            # shutdown (the lease then runs out as before).
            with contextlib.suppress(PyMongoError, TimeoutError):
                async with asyncio.timeout(LET_GO_SECONDS):
                    await main_line.let_go(self.runtime.db, owner=self.worker)

    async def _idle(self) -> None:
        """Wait for new events; or, while another replica holds the main line, one poll
        interval without the stream. Only the holder is woken by inserts: a wake-up per insert
        sent every other replica to fail to take the lease (what replicas cost the server,
        measured in bench/replicas.py). A holder that released the lease when idle and then
        went away is replaced within a poll interval; one that died holding it, when the lease
        runs out, as before."""
        await self.wakeup.wait(stream=not self._lease_elsewhere)

    async def _linger(self) -> None:
        """A pause between batches (INGEST_BATCH_LINGER_SECONDS), cut short by ``stop``. A batch
        holds the pending refreshes of its users from its start (Queue.hold_pending); without
        the pause the next batch began as the last one committed, and held its refreshes again
        before the app could claim them: under load either the app's claim or the batch met a
        write conflict, and a refresh waited a second batch. In the pause the app claims them,
        and the events arriving join the next batch (bench/RESULTS.md, README "Throughput")."""
        if seconds := self.settings.ingest_batch_linger_seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    async def drain(self) -> int:
        """Apply batches until none is left (tests, the CLI, shutdown hooks)."""
        total = 0
        while handled := await self.process_one_batch():
            total += handled
        return total

    async def process_one_batch(self, *, aside_always: bool = True) -> int:
        """One batch of the events aside (unless ``aside_always`` is off and they were looked
        at less than a poll interval ago), then one of the main line."""
        handled = 0
        if aside_always or self._aside_due():
            handled += await self._aside_pass()
        handled += await self.main_line_batch()
        if self._aside_due():  # the main line just moved events aside
            handled += await self._aside_pass()
        return handled

    async def _aside_pass(self) -> int:
        """Aside first: those events arrived earlier than any above the mark."""
        self._aside_looked = time.monotonic()
        return await self.aside_batch()

    def _aside_due(self) -> bool:
        """Events aside wait for a retry time: looking once per poll interval is enough while
        the main line is busy (a query per batch saved), and always when it is idle."""
        return time.monotonic() - self._aside_looked >= self.settings.ingest_poll_interval_seconds

    # --- the main line: events above the high-water mark ---------------------------------

    async def main_line_batch(self) -> int:
        db = self.runtime.db
        lease = self.settings.ingest_lease_seconds
        self._lease_elsewhere = False  # also after a failed try: it is not known to be held
        read = await main_line.lease(db, owner=self.worker, seconds=lease)
        if read is None:  # another replica applies the main line now
            self._lease_elsewhere = True
            return 0
        try:
            # A batch is the whole backlog above the mark, up to INGEST_MAX_BATCH_SIZE: caught
            # up, the few events that arrived; behind, one large transaction and one score
            # refresh per user, since a batch's work on devices, users, refreshes and its
            # commit is paid once whatever its size (bench/ingest.py: up to 500 vs 5,000).
            limit = self.settings.ingest_max_batch_size
            documents = await main_line.above_mark(db, read, limit=limit)
            verdicts = await self._hole_verdicts(read, documents)
        except BaseException:
            # Nothing was tried: the lease's attempt is given back, or a few database blips
            # while idle would move the next healthy batch aside untried.
            with contextlib.suppress(PyMongoError):
                await main_line.release(db, owner=self.worker)
            raise
        step = main_line.step(
            read, documents, hole_ready=lambda *h: verdicts.get(h), now=datetime.now(UTC)
        )
        if not step.take:
            await main_line.release(db, owner=self.worker)
            if step.waiting_at is not None:
                counters.BATCHES.labels("waiting_at_gap").inc()
            return 0
        self._holes_seen = {n: t for n, t in self._holes_seen.items() if n > step.to.through}
        # An older release's events carry `processed`: applied, or adopted aside at start-up.
        mine = [d for d in step.take if "processed" not in d]
        if read.attempts > SPLIT_AFTER_ATTEMPTS:
            # Earlier attempts at this batch died without an error (a worker killed while
            # applying it): aside, each event has its own attempts and failures are isolated.
            log.warning("main line: batch at %d died %d times; moved aside",
                        read.through, read.attempts - 1)  # fmt: skip
            died = min(read.attempts - 1, SPLIT_AFTER_ATTEMPTS)  # never past the aside's own
            await self._move_aside(read, step.to, mine, attempts=died)
            return 0  # the aside claim, due at once, applies them
        batch, unreadable = split_readable(mine)
        finish = self._advance(read, step.to, dead=unreadable)

        async def renew() -> None:
            await main_line.renew(db, owner=self.worker, seconds=lease)

        try:
            await self._apply(batch, finish=finish, renew=renew)
            for document, reason in unreadable:
                counters.EVENTS_DEAD.inc()
                log.error("event %s set aside: %s", document["_id"], reason)
        except LeaseLost:
            counters.BATCHES.labels("lease_lost").inc()
            log.warning("main line batch at %d: another worker moved the mark", read.through)
        except Exception as exc:
            if not events_fault(exc):
                raise
            # Something in the batch fails it: aside, it is split until the events at fault
            # are alone (I11); everyone else is applied in the next pass.
            log.warning("main line batch at %d failed (%s); moved aside to isolate it",
                        read.through, describe(exc))  # fmt: skip
            await self._move_aside(read, step.to, mine, attempts=0)
            return 0
        # Also after a lost lease: the rival's transaction applied them instead, and a count
        # above zero sends drain() and the run loop to look again at once.
        return len(step.take)

    async def _hole_verdicts(
        self, read: main_line.Progress, documents: list[dict[str, Any]]
    ) -> dict[tuple[int, int], main_line.HoleVerdict]:
        """Holes above the mark the batch may pass now: every number in them recorded by
        ingest as never to be stored, or the hole older than INGEST_GAP_WAIT_SECONDS."""
        holes, previous = [], read.through
        for document in documents:
            seq = int(document["seq"])
            if seq > previous + 1:
                holes.append((previous + 1, seq - 1))
            previous = max(previous, seq)
        if not holes:
            return {}
        known = await main_line.known_holes(self.runtime.db, holes[0][0], holes[-1][1])
        now, wait = time.monotonic(), self.settings.ingest_gap_wait_seconds
        verdicts: dict[tuple[int, int], main_line.HoleVerdict] = {}
        for first, last in holes:
            seen = self._holes_seen.setdefault(first, now)
            if all(n in known for n in range(first, last + 1)):
                verdicts[first, last] = "never_fills"
            elif now - seen >= wait:
                verdicts[first, last] = "old"
        return verdicts

    def _advance(
        self,
        read: main_line.Progress,
        to: main_line.Progress,
        *,
        dead: Sequence[tuple[dict[str, Any], str]] = (),
    ) -> Finish:
        """The mark moves to ``to``. ``dead``: the batch's events that can never be read back
        (split_readable), copied aside set aside in the same transaction: a copy exists only
        once the mark has passed its event, so there is never one to count twice while the
        batch is tried again, nor one for an operator's purge to race with."""

        async def finish(session: AsyncClientSession, ready: list[AttributedEvent]) -> None:
            for document, reason in dead:
                state = dead_state(reason)
                await events_aside.move_aside(
                    self.runtime.db, [document], state=state, session=session
                )
            if not await main_line.advance(
                self.runtime.db, owner=self.worker, read=read, to=to, session=session
            ):
                raise LeaseLost("another worker moved the main line's mark")

        return finish

    async def _move_aside(
        self,
        read: main_line.Progress,
        to: main_line.Progress,
        documents: list[dict[str, Any]],
        *,
        attempts: int,
    ) -> None:
        """Hand the batch's events to the aside claim and move the mark past them, at once."""

        async def move(session: AsyncClientSession) -> None:
            await events_aside.move_aside(
                self.runtime.db, documents,
                state={"leaseUntil": UNCLAIMED, "attempts": attempts}, session=session,
            )  # fmt: skip
            await self._advance(read, to)(session, [])

        try:
            await in_transaction(self.runtime.client, move)
        except LeaseLost:
            counters.BATCHES.labels("lease_lost").inc()
            return
        counters.BATCHES.labels("moved_aside").inc()
        self._aside_looked = -float("inf")  # look for them in this very pass

    # --- events aside: claimed one batch at a time ---------------------------------------

    async def claim_batch(self) -> tuple[str, list[dict[str, Any]]]:
        """Lease up to a batch of events aside in arrival order: four commands, whatever
        the batch size. When the first one's claims already died twice without applying it (a
        worker killed while applying it, again and again), it is claimed alone: a crash loop
        then costs attempts to that event only, never to the events claimed with it."""
        now = datetime.now(UTC)
        free = {"processed": False, "leaseUntil": {"$lte": now}}
        first = await self.aside.find(
            free, {"seq": 1, "attempts": 1}, sort=[("seq", 1)],
            limit=self.settings.ingest_batch_size,
        ).to_list()  # fmt: skip
        if first and first[0].get("attempts", 0) >= CRASH_LOOP_ATTEMPTS:
            first = first[:1]
        arrivals = [d["seq"] for d in first]
        if not arrivals:
            return "", []
        token = uuid.uuid4().hex
        lease_until = now + timedelta(seconds=self.settings.ingest_lease_seconds)
        await mongo.update_many(
            self.aside,
            {**free, "seq": {"$lte": arrivals[-1]}},
            {"$set": {"leaseUntil": lease_until, "claimToken": token}, "$inc": {"attempts": 1}},
        )
        claimed = await self.aside.find({"claimToken": token, "processed": False}).to_list()
        return token, claimed

    async def aside_batch(self) -> int:
        token, documents = await self.claim_batch()
        if not documents:
            return 0
        usable = await self._set_aside_exhausted(documents, token)
        batch, unreadable = split_readable(usable)
        for document, reason in unreadable:
            await self._set_aside(document["_id"], reason, token=token)
        if not batch:
            return len(documents)
        attempts = {d["_id"]: int(d.get("attempts", 0)) for d in usable}
        try:
            await self._apply_isolating(token, batch, attempts, whole=True)
        except LeaseLost:
            counters.BATCHES.labels("lease_lost").inc()
            log.warning(
                "ingest batch of %d events: lease lost, another worker applies it", len(batch)
            )
        except PyMongoError as exc:
            await self._record_error(token, exc)
            raise
        return len(documents)

    async def _apply(
        self,
        batch: list[StoredEvent],
        *,
        finish: Finish,
        renew: Any,
        claim: str | None = None,
    ) -> None:
        """Apply ``batch`` in one transaction. The lease is renewed before each retry of it (a
        write conflict), so a batch that takes long in total is not taken over by another
        replica; never while a transaction runs, and never on the first attempt (the lease was
        just taken)."""
        started = time.perf_counter()
        tries = 0

        async def apply(session: AsyncClientSession) -> None:
            nonlocal tries
            tries += 1
            if tries > 1:
                await renew()
            await self.apply_batch(session, batch, finish=finish, claim=claim)

        await in_transaction(self.runtime.client, apply)
        counters.BATCHES.labels("applied").inc()
        counters.BATCH_SECONDS.observe(time.perf_counter() - started)
        counters.EVENTS_PROCESSED.inc(len(batch))

    async def _apply_isolating(
        self, token: str, batch: list[StoredEvent], attempts: dict[str, int], *, whole: bool
    ) -> None:
        """Apply the batch in one transaction; if it fails because of what is in it, split it
        in halves until the failing events are alone (I11): only they wait for a retry or are
        set aside, every other event is applied in this same pass."""

        async def renew() -> None:
            await self._renew_lease(token)

        try:
            await renew()  # each part of a split batch
            await self._apply(
                batch, finish=self._mark_processed(token, whole=whole), renew=renew, claim=token
            )
        except Exception as exc:
            # A failure that blames no event (a timeout, a crash) is retried as a whole claim;
            # when the same events' claims already died, it may well be one of them after all.
            died_before = all(attempts.get(e.id, 0) >= SPLIT_AFTER_ATTEMPTS for e in batch)
            if not (events_fault(exc) or (died_before and retry_splits(exc))):
                raise
            if len(batch) == 1:
                await self._failed_alone(token, batch[0], attempts.get(batch[0].id, 0), exc)
                return
            counters.BATCHES.labels("split").inc()
            half = len(batch) // 2
            await self._apply_isolating(token, batch[:half], attempts, whole=False)
            await self._apply_isolating(token, batch[half:], attempts, whole=False)

    def _mark_processed(self, token: str, *, whole: bool) -> Finish:
        """``whole``: the batch is every event still claimed by ``token``; else a part of it,
        split off to isolate a failure (then it is marked by id)."""

        async def finish(session: AsyncClientSession, ready: list[AttributedEvent]) -> None:
            mine: dict[str, Any] = {"claimToken": token, "processed": False}
            if not whole:
                mine["_id"] = {"$in": [e.id for e in ready]}
            marked = await self.aside.update_many(
                mine, events_aside.applied_update(), session=session
            )
            if marked.modified_count != len(ready):
                raise LeaseLost(f"{len(ready) - marked.modified_count} events were taken over")

        return finish

    async def _failed_alone(
        self, token: str, event: StoredEvent, attempts: int, exc: BaseException
    ) -> None:
        """One event failed on its own. Retried after a backoff (attempts are per event); set
        aside once it has failed ``QUEUE_MAX_ATTEMPTS`` times."""
        reason = describe(exc)
        if attempts >= self.settings.queue_max_attempts:
            await self._set_aside(event.id, reason, token=token)
            return
        delay = min(
            self.settings.queue_backoff_base_seconds * 2 ** max(attempts - 1, 0),
            self.settings.queue_backoff_max_seconds,
        )
        await self.aside.update_one(
            {"_id": event.id, "claimToken": token},
            {
                "$set": {
                    "lastError": reason,
                    "leaseUntil": datetime.now(UTC) + timedelta(seconds=delay),
                },
                "$unset": {"claimToken": ""},
            },
        )
        log.warning(
            "event %s failed alone (attempt %d), retried in %.0fs: %s",
            event.id,
            attempts,
            delay,
            reason,
        )

    async def _set_aside(self, event_id: str, reason: str, *, token: str) -> None:
        """An event of this worker's claim aside will not be tried again until an operator
        retries it. Filtered on the claim: a worker that lost it changes nothing."""
        await self.aside.update_one(
            {"_id": event_id, "claimToken": token, "processed": False},
            {"$set": dead_state(reason), "$unset": {"claimToken": ""}},
        )
        counters.EVENTS_DEAD.inc()
        log.error("event %s set aside: %s", event_id, reason)

    async def _renew_lease(self, token: str) -> None:
        """Renew the batch's lease before each transaction attempt (a retry after a write
        conflict, each part of a split batch), so a batch that takes long in total is not taken
        over by another replica. Never while a transaction runs: the renewal writes the very
        documents the transaction marks, and would make it conflict again on every retry. One
        attempt is bounded by the server's transaction lifetime, as long as the default lease.
        Not part of the batch's transaction: it must hold even if that one aborts."""
        lease = timedelta(seconds=self.settings.ingest_lease_seconds)
        await mongo.update_many(
            self.aside,
            {"claimToken": token, "processed": False},
            {"$set": {"leaseUntil": datetime.now(UTC) + lease}},
        )

    async def _set_aside_exhausted(
        self, documents: list[dict[str, Any]], token: str
    ) -> list[dict[str, Any]]:
        """Events claimed max attempts times (their workers kept dying) are set aside."""
        limit = self.settings.queue_max_attempts
        exhausted = {d["_id"] for d in documents if d.get("attempts", 0) > limit}
        for event_id in sorted(exhausted):
            reason = f"claimed {limit} times without being applied"
            await self._set_aside(event_id, reason, token=token)
        return [d for d in documents if d["_id"] not in exhausted]

    async def _record_error(self, token: str, exc: BaseException) -> None:
        try:
            await mongo.update_many(
                self.aside,
                {"claimToken": token, "processed": False},
                {"$set": {"lastClaimError": describe(exc)}},
            )
        except PyMongoError:
            log.exception("could not record the batch error")

    async def apply_batch(
        self,
        session: AsyncClientSession,
        batch: list[StoredEvent],
        *,
        finish: Finish,
        claim: str | None,
    ) -> None:
        """Steps 1-5 of the module docstring. ``claim``: the token of the claim aside the batch
        is (None: the main line's batch)."""
        db = self.runtime.db
        keys = await known_keys(db, {e.key_hash for e in batch if e.key_hash}, session=session)
        split = attribute(
            batch,
            keys,
            now=datetime.now(UTC),
            grace=timedelta(seconds=self.settings.key_resolve_grace_seconds),
        )
        owners = await load_owners(db, {e.device for e in batch}, session=session)
        # Every user this batch may re-project: their pending refreshes are taken now, not when
        # the batch publishes at its end (Queue.hold_pending).
        users = {key.owner for key in keys.values() if key.owner} | set(owners.values())
        await self.refreshes.hold_pending(map(score_refresh_key, users), session=session)
        held = behind_a_waiting_key(split, owners)
        held |= await self._behind_earlier_keyed_events(split.ready, owners, batch, session)
        ready = [e for e in split.ready if e.id not in held]
        await self._defer(split.waiting + [e for e in batch if e.id in held], session, claim=claim)
        written = await apply_events(db, ready, owners=owners, session=session)
        failpoints.hit(AFTER_METRICS_WRITE)

        devices_by_user = user_devices(ready, written)
        await bind_devices(db, devices_by_user, session=session)
        bound = set(written.new_owners.values())
        reasons: dict[str, RefreshReason] = {
            user: "binding" if user in bound else "ingest" for user in devices_by_user
        }
        await write_projections(
            db=db,
            refreshes=self.refreshes,
            reasons=reasons,
            session=session,
            events_received_at=max((e.received_at for e in ready), default=None),
            refreshes_not_before=self._burst_delays(ready, written),
        )
        failpoints.hit(BEFORE_MARK_PROCESSED)
        await finish(session, ready)
        await self._record_unattributed(
            {i: why for i, why in split.unattributed.items() if i not in held}, session
        )
        failpoints.hit(BEFORE_COMMIT)

    def _burst_delays(
        self, ready: list[AttributedEvent], written: DeviceWrite
    ) -> dict[str, datetime]:
        """When the refreshes of the users in a burst may be claimed (processing/bursts.py)."""
        delay = self.settings.score_refresh_burst_delay_seconds
        if not delay:
            return {}
        users = self.bursts.bursting(ready, owners=written.owners)
        if users:
            counters.BURST_REFRESHES_DELAYED.inc(len(users))
        at = datetime.now(UTC) + timedelta(seconds=delay)
        return dict.fromkeys(users, at)

    async def _behind_earlier_keyed_events(
        self,
        ready: list[AttributedEvent],
        owners: dict[str, str],
        batch: list[StoredEvent],
        session: AsyncClientSession,
    ) -> set[str]:
        """Authenticated events on a device with no owner yet wait behind any earlier event of
        that device that carries a key and is still unapplied outside this batch: waiting for
        its key, or claimed in another batch or the other half of a split (I3: the first
        authenticated arrival owns the device). Unapplied aside or on the main line: an older
        release's event aside may be numbered above an unapplied one of the main line. Not
        behind one that failed (``lastError``): a failing event never holds others back (I11);
        the device then goes to the next."""
        candidates = [e for e in ready if e.user_id is not None and e.device not in owners]
        if not candidates:
            return set()
        unapplied = await main_line.unapplied_on_devices(
            self.runtime.db,
            sorted({e.device for e in candidates}),
            below=max(e.arrival for e in candidates),
            session=session,
        )
        in_batch = {e.id for e in batch}
        first: dict[str, int] = {}
        for event in unapplied:
            if (
                event.get("keyHash") is not None
                and event.get("dead") is not True
                and "lastError" not in event
                and event["_id"] not in in_batch
            ):
                device = event["distinctId"]
                first[device] = min(first.get(device, event["seq"]), event["seq"])
        return {e.id for e in candidates if e.arrival > first.get(e.device, e.arrival)}

    async def _defer(
        self,
        waiting: list[StoredEvent],
        session: AsyncClientSession,
        *,
        claim: str | None,
    ) -> None:
        """Events whose key is not known yet (and those behind them) go aside, unclaimed, to be
        looked at again shortly. Waiting is not failing: a claim's attempt is given back. Aside,
        filtered on the claim: a worker that lost it must not give back, nor unclaim, what its
        rival holds now (a batch of waiting events alone has nothing else to fail on)."""
        if not waiting:
            return
        retry_at = datetime.now(UTC) + timedelta(seconds=self.settings.key_resolve_retry_seconds)
        if claim is None:  # from the main line: copied aside, no claim counted an attempt
            state = {"leaseUntil": retry_at, "attempts": 0}
            documents = [e.document for e in waiting]
            await events_aside.move_aside(self.runtime.db, documents, state=state, session=session)
            return
        update = {
            "$set": {"leaseUntil": retry_at},
            "$unset": {"claimToken": ""},
            "$inc": {"attempts": -1},
        }
        ids = [e.id for e in waiting]
        deferred = await update_by_ids(
            self.aside, ids, update, only={"claimToken": claim}, session=session
        )
        if deferred != len(ids):
            raise LeaseLost(f"{len(ids) - deferred} waiting events were taken over")

    async def _record_unattributed(
        self, unattributed: dict[str, str], session: AsyncClientSession
    ) -> None:
        """Events with a key that counted as no key: rare, kept visible for operators."""
        by_reason: dict[str, list[str]] = defaultdict(list)
        for event_id, reason in unattributed.items():
            by_reason[reason].append(event_id)
        for reason, ids in sorted(by_reason.items()):
            await self.events.update_many(
                {"_id": {"$in": ids}}, {"$set": {"unattributed": reason}}, session=session
            )


def events_fault(exc: BaseException) -> bool:
    """Whether a failure may be caused by what the batch holds, so splitting it can isolate the
    events at fault. Not: a lost lease, a failpoint (a crash), or the database being away or
    busy (transient errors with_transaction already retried): then the whole claim is retried
    after its lease, and no event is blamed."""
    if isinstance(exc, LeaseLost | failpoints.FailpointError | asyncio.CancelledError):
        return False
    if isinstance(exc, ConnectionFailure | ExecutionTimeout | WTimeoutError):
        return False
    labels = ("TransientTransactionError", "UnknownTransactionCommitResult", "RetryableWriteError")
    return not (isinstance(exc, PyMongoError) and any(map(exc.has_error_label, labels)))


def retry_splits(exc: BaseException) -> bool:
    """On a claim that died before, everything but a lost lease, a cancellation or the
    database being unreachable is split to find the events at fault."""
    return not isinstance(exc, LeaseLost | asyncio.CancelledError | ConnectionFailure)


def split_readable(
    documents: list[dict[str, Any]],
) -> tuple[list[StoredEvent], list[tuple[dict[str, Any], str]]]:
    """Stored events, and those that cannot be read back as CLI events (stored by an older
    release under older rules) with why: they can never be applied, and are set aside at once.
    Any reason one cannot be read is that event's alone."""
    readable: list[StoredEvent] = []
    unreadable: list[tuple[dict[str, Any], str]] = []
    for document in documents:
        try:
            readable.append(StoredEvent.from_document(document))
        except Exception as exc:
            unreadable.append((document, f"unreadable: {describe(exc)}"))
    return readable, unreadable


def dead_state(reason: str) -> dict[str, Any]:
    """An event set aside: kept with its reason, parked, until an operator acts."""
    return {
        "dead": True,
        "leaseUntil": PARKED,
        "lastError": reason,
        "setAsideAt": datetime.now(UTC),
    }


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def user_devices(events: list[AttributedEvent], written: DeviceWrite) -> dict[str, set[str]]:
    """userId -> devices of the batch to add to its identity entry: the devices it
    authenticated on, and the devices it owns (even for anonymous-only events: that is what
    re-scores a bound device's owner when the device sends without a key)."""
    pairs = {(e.user_id, e.device) for e in events if e.user_id}
    pairs |= {(owner, e.device) for e in events if (owner := written.owners.get(e.device))}
    devices: dict[str, set[str]] = defaultdict(set)
    for user_id, device in pairs:
        devices[user_id].add(device)
    return dict(devices)
