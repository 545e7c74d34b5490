"""The work queue: how a message moves pending -> active -> done | dead (SPEC section 3).

Every state change after a claim filters on ``{_id, claimToken, status: active}`` and checks
``modified_count``, so a worker that lost its lease can never ack, fail or renew another
worker's claim.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pymongo import InsertOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from shared_contracts import mongo
from shared_contracts.messages import Message, types_for_queue
from shared_contracts.queue import metrics
from shared_contracts.queue.config import QueueConfig
from shared_contracts.queue.documents import (
    ACTIVE,
    DEAD,
    DONE,
    PARKED,
    PENDING,
    STATUSES,
    error_record,
    new_document,
    payload_of,
)

log = logging.getLogger(__name__)

Document = dict[str, Any]
Clock = Callable[[], datetime]
DUPLICATE_KEY = 11000
#: The server's answer to a write on a document another open transaction has written.
WRITE_CONFLICT = 112
#: A message of an ordering key in one of these holds back the later ones of its key.
UNFINISHED = (ACTIVE, PENDING)


def utcnow() -> datetime:
    return datetime.now(UTC)


class LeaseLost(Exception):
    """The claim is no longer ours (expired and taken by another worker): do not commit."""


class HeldElsewhere(Exception):
    """A claim's write met a write conflict again on its last attempt: a message of it is
    written by a transaction still open (a watcher batch's hold_pending), which only its
    commit ends; retrying would wait that long, and so would every other message of the claim."""


@dataclass(frozen=True, slots=True)
class Claim:
    id: Any
    token: str
    document: Document

    @property
    def attempts(self) -> int:
        value = self.document.get("attempts")
        return value if isinstance(value, int) else 0

    @property
    def max_attempts(self) -> int:
        value = self.document.get("maxAttempts")
        return value if isinstance(value, int) and value > 0 else 1

    @property
    def ordering_key(self) -> str | None:
        key = self.document.get("orderingKey")
        return key if isinstance(key, str) else None

    def owned(self) -> dict[str, Any]:
        """The filter that matches this claim only while it is still ours."""
        return {"_id": self.id, "claimToken": self.token, "status": ACTIVE}


#: Attempts of a whole claim whose write meets a conflict, before it is cut up: a claim that
#: committed first is gone on the second; a message held by an open transaction is still there.
CLAIM_ATTEMPTS = 2
#: Transactions one claim_many may spend cutting claims up around held messages: finding one
#: held message among 100 takes 15. Past it, what is not sorted out is left to the next claim.
CLAIM_TRANSACTIONS = 24
#: Of those, what trying the messages found held before may spend: most are usually still held
#: (a user's batches run back to back), and must not use up what the others need.
HELD_RECHECK_TRANSACTIONS = 4
#: Rounds of one claim whose finds were all parked behind earlier messages of their keys
#: before it answers "nothing": each round parks the whole pending backlog of the keys it
#: found, so a round per blocked key; only a pathological queue reaches it (a claim that gave
#: up after three ended drains early).
PARK_ROUNDS = 500


@dataclass(slots=True, kw_only=True)
class _Claiming:
    """One claim_many call, claimed in one or more transactions under one token."""

    worker: str
    token: str
    now: datetime
    available: Document
    claims: list[Claim] = field(default_factory=list)
    #: The claims behind an earlier message of their key: parked after the commits.
    blocked: list[Claim] = field(default_factory=list)
    #: Transactions this call may still start (CLAIM_TRANSACTIONS).
    budget: int = CLAIM_TRANSACTIONS


def backoff_seconds(
    attempts: int, config: QueueConfig, rng: Callable[[], float] = random.random
) -> float:
    """Exponential with equal jitter: the delay never shrinks between attempts, yet spreads."""
    growth: float = 2.0 ** max(attempts - 1, 0)
    ceiling = min(config.backoff_max_seconds, config.backoff_base_seconds * growth)
    return ceiling / 2 + rng() * ceiling / 2


#: Queries for documents no claim can ever match, or whose claim would fail, and why.
MALFORMED: list[tuple[Document, str]] = [
    ({"status": {"$nin": list(STATUSES)}}, "missing or unknown status"),
    ({"status": PENDING, "availableAt": {"$not": {"$type": "date"}}}, "availableAt is not a date"),
    (
        {"status": PENDING, "attempts": {"$exists": True, "$not": {"$type": "number"}}},
        "attempts is not a number",
    ),
    # A claim's $inc overflows it: every claim of the batch would fail, forever.
    ({"status": PENDING, "attempts": {"$gte": 2**62}}, "attempts beyond any limit"),
    (
        {"status": ACTIVE, "leaseUntil": {"$not": {"$type": "date"}}},
        "active without a leaseUntil date",
    ),
]

_CLAIM_RELEASED = {"$set": {"leaseUntil": None, "claimToken": None, "claimedBy": None}}


ToPending = Literal["pending", "superseded", "missed"]


async def to_pending(
    collection: AsyncCollection[Document],
    query: Document,
    fields: Document,
    *,
    now: datetime,
    inc: Document | None = None,
) -> ToPending:
    """The one way a message goes back to pending (retry, release, reap, park, operator retry).

    If another message with the same dedupeKey is already pending, the unique partial index
    refuses the move, and the one with the older payload gives way, finished as done
    (``supersededAt``), never lost and never blocking the index: usually this one, as the
    pending one absorbed every later publish; but a message parked behind its key may be
    newer than the one parked before it, and then the pending one gives way.
    """
    update: Document = {"$set": {**_CLAIM_RELEASED["$set"], **fields, "status": PENDING}}
    if inc:
        update["$inc"] = inc
    superseded = {
        **_CLAIM_RELEASED["$set"],
        "status": DONE,
        "doneAt": now,
        "updatedAt": now,
        "supersededAt": now,
    }
    for _ in range(3):
        try:
            result = await collection.update_one(query, update)
            return "pending" if result.modified_count == 1 else "missed"
        except DuplicateKeyError:
            pass
        mine = await collection.find_one(query, {"dedupeKey": 1, "payloadSeq": 1, "orderSeq": 1})
        if mine is None:
            return "missed"
        waiting = await collection.find_one(
            {"dedupeKey": mine.get("dedupeKey"), "status": PENDING},
            {"payloadSeq": 1, "orderSeq": 1},
        )
        if waiting is None:
            continue  # claimed meanwhile: nothing pending to collide with any more
        if _payload_seq(waiting) < _payload_seq(mine):
            # The waiting one is older: it gives way, then this one moves (again).
            outcome = await collection.update_one(
                {"_id": waiting["_id"], "status": PENDING}, {"$set": superseded}
            )
            if outcome.modified_count == 1:
                metrics.OUTCOMES.labels(collection.name, "superseded").inc()
            continue
        result = await collection.update_one(query, {"$set": superseded})
        if result.modified_count == 1:
            metrics.OUTCOMES.labels(collection.name, "superseded").inc()
            return "superseded"
        return "missed"
    return "missed"


def behind_earlier(claims: list[Claim], unfinished: list[Document]) -> list[Claim]:
    """The claims behind an unfinished message of their key with a lower orderSeq (another
    worker's, or one in this very batch), by the unfinished messages of their keys."""
    first: dict[str, int] = {}
    for document in unfinished:
        key, seq = document.get("orderingKey"), document.get("orderSeq")
        if isinstance(key, str) and isinstance(seq, int) and seq < first.get(key, seq + 1):
            first[key] = seq
    return [
        claim
        for claim in claims
        if claim.ordering_key is not None
        and isinstance(seq := claim.document.get("orderSeq"), int)
        and first.get(claim.ordering_key, seq) < seq
    ]


def _available_at(document: Document) -> datetime | None:
    available = document.get("availableAt")
    if not isinstance(available, datetime):  # malformed: no claim's range matches it
        return None
    if available.tzinfo is None:  # a client without tz_aware
        return available.replace(tzinfo=UTC)
    return available


def _one_pending_per_key(document: Document) -> bool:
    """Whether the message's ordering key is its dedupe key: then it is its key's only
    pending message while it is pending."""
    key = document.get("orderingKey")
    return isinstance(key, str) and document.get("dedupeKey") == key


def _claimed_by(document: Document, token: str, ids: set[Any]) -> bool:
    """Whether a document read in a claim's transaction is one of its claims."""
    return bool(
        document["_id"] in ids
        and document.get("claimToken") == token
        and document.get("status") == ACTIVE
    )


def _parked(document: Document) -> bool:
    return _available_at(document) == PARKED


def _order_seq(document: Document) -> int:
    """Publish order within a key; a document without one sorts first, as the server sorts."""
    seq = document.get("orderSeq")
    return seq if isinstance(seq, int) else -1


def _payload_seq(document: Document) -> int:
    """When a message's payload was published (older releases' documents: their orderSeq)."""
    value = document.get("payloadSeq", document.get("orderSeq"))
    return value if isinstance(value, int) else 0


class Queue:
    """One queue collection. Cheap to construct; share one per process and collection."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        *,
        config: QueueConfig,
        types: Mapping[str, type[Message]] | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.collection = collection
        self.name = collection.name
        self.config = config
        self.types = dict(types) if types is not None else types_for_queue(collection.name)
        self.clock = clock
        #: The messages the last claim found held by another transaction, by ordering key.
        self._held: dict[Any, Any] = {}
        self._may_be_held = any(model.HELD_BY_PUBLISHER for model in self.types.values())
        self._deduped_by_ordering_key = bool(self.types) and all(
            model.DEDUPED_BY_ORDERING_KEY for model in self.types.values()
        )
        #: When the first pending message the last claim_many saw but could not claim yet (a
        #: retry's backoff, a burst's delayed refresh) becomes available; None if it saw none.
        self.next_available_at: datetime | None = None
        #: Whether the last claim_many read every pending message there was (but those held):
        #: then another claim finds something only after a change (Consumer's wake-up).
        self.saw_every_pending = False

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, message: Message, *, session: AsyncClientSession | None = None) -> None:
        """Store a message; inside the caller's transaction when ``session`` is given."""
        self._check_queue(message)
        now = self.clock()
        document = new_document(
            message, now=now, max_attempts=self.config.max_attempts, order_seq=time.time_ns()
        )
        metrics.PUBLISHED.labels(self.name, message.type).inc()
        if "dedupeKey" in document:
            await self._publish_coalesced(document, session)
            return
        key: str | None = document.get("orderingKey")
        parked = key is not None and await self._has_unfinished(key, session)
        if parked:
            document["availableAt"] = PARKED  # waits until the earlier messages are finished
        await self.collection.insert_one(document, session=session)
        if parked and key is not None:
            await self._promote_once_visible(key, session)

    async def _promote_once_visible(self, key: str, session: AsyncClientSession | None) -> None:
        """A message just parked behind an unfinished one of its key: promote the key once it
        is visible. If that one finished after this publish's check, its own promotion could
        not see this message, which then waited for the reaper (tests/queue/
        test_publish_park_race.py). One of the two always sees the other: this promotion reads
        after this publish committed, and finds the earlier one unfinished only if that one's
        finish, and the promotion after it, are still to come."""
        if session is None:
            await self.promote(key)
        elif not mongo.after_commit(session, lambda: self.promote(key)):
            log.debug("%s: a publish parked outside in_transaction; the reaper promotes", key)

    async def publish_many(
        self,
        messages: Iterable[Message],
        *,
        session: AsyncClientSession | None = None,
        not_before: datetime | None = None,
    ) -> None:
        """One bulk write for many messages (the backfill's publish).

        Ordering keys are enforced at claim time (a message claimed ahead of an earlier one of
        its key waits again), so the bulk path needs no per-message look-up.

        ``not_before``: a message stored by this publish is claimable from then on (a burst's
        score refreshes wait for the rest of the burst). One already pending that a message
        coalesces into keeps its own time: a publish never moves it, as it may be parked. On
        a queue ordered without a dedupe key, a waiting message parked behind an earlier one
        of its key goes when its turn comes, its time forgotten, as a retry's backoff is;
        score_refresh has one pending message per user, never parked behind another.
        """
        now = self.clock()
        operations: list[InsertOne[Document] | UpdateOne] = []
        for message in messages:
            self._check_queue(message)
            document = new_document(
                message, now=now, max_attempts=self.config.max_attempts, order_seq=time.time_ns()
            )
            if not_before is not None and not_before > now:
                document["availableAt"] = not_before
            metrics.PUBLISHED.labels(self.name, message.type).inc()
            if "dedupeKey" in document:
                operations.append(UpdateOne(*self._coalescing_upsert(document), upsert=True))
            else:
                operations.append(InsertOne(document))
        if not operations:
            return
        try:
            await self.collection.bulk_write(operations, ordered=False, session=session)
        except BulkWriteError as exc:
            # A concurrent publisher inserted the pending message first: our upserts now update
            # it. Upserts are idempotent, so the whole batch can simply go again, once.
            if session is not None or not _only_duplicate_keys(exc):
                raise
            await self.collection.bulk_write(operations, ordered=False)

    def _coalescing_upsert(self, document: Document) -> tuple[Document, Document]:
        replaceable = {
            **payload_of(document),
            "updatedAt": document["updatedAt"],
            "payloadSeq": document["payloadSeq"],
        }
        if "requestId" in document:  # the latest publisher's request, like the payload
            replaceable["requestId"] = document["requestId"]
        first_time = {k: v for k, v in document.items() if k not in replaceable and k != "status"}
        first_time.pop("dedupeKey")
        return (
            {"dedupeKey": document["dedupeKey"], "status": PENDING},
            {"$set": replaceable, "$setOnInsert": first_time},
        )

    async def _publish_coalesced(
        self, document: Document, session: AsyncClientSession | None
    ) -> None:
        # At most one pending message per key (unique partial index): update it, else insert.
        # One may be active meanwhile; the new one then waits as the single pending one.
        query, update = self._coalescing_upsert(document)
        try:
            await self.collection.update_one(query, update, upsert=True, session=session)
        except DuplicateKeyError:
            if session is not None:
                raise  # inside a transaction the caller's retry loop owns the retry
            await self.collection.update_one(query, update, upsert=True)

    async def hold_pending(
        self, ordering_keys: Iterable[str], *, session: AsyncClientSession
    ) -> None:
        """Write the pending messages of these ordering keys now, early in the caller's
        transaction, when its end will publish into them (score_refresh: the dedupe key is
        the ordering key, so the pending message is the one a publish coalesces into). A claim
        of one of them that commits in between would make that publish meet a write conflict
        and rerun the whole transaction (nearly every watcher batch under load: bench/); held,
        the claim meets the conflict instead and retries, with the driver's backoff, a claim,
        not a batch; a plain write to a held message waits for the commit. Only ``updatedAt``
        changes: nothing a wake-up stream or a consumer reads. By ordering key, not dedupe key:
        the embedded server plans that on the ordering index, and scanned the collection for
        {status, dedupeKey: {$in}}."""
        keys, now = sorted(set(ordering_keys)), self.clock()
        for start in range(0, len(keys), mongo.MAX_IN_IDS):  # a batch may touch thousands
            await self.collection.update_many(
                {"status": PENDING, "orderingKey": {"$in": keys[start : start + mongo.MAX_IN_IDS]}},
                {"$set": {"updatedAt": now}},
                session=session,
            )

    def _check_queue(self, message: Message) -> None:
        if self.name != message.QUEUE and message.type not in self.types:
            raise ValueError(f"{message.type} belongs on {message.QUEUE}, not {self.name}")

    async def _has_unfinished(self, ordering_key: str, session: AsyncClientSession | None) -> bool:
        return bool(await self._unfinished([ordering_key], session=session))

    async def _unfinished(
        self,
        keys: Iterable[str],
        *,
        statuses: tuple[str, ...] = UNFINISHED,
        session: AsyncClientSession | None = None,
        whole: bool = False,
    ) -> list[Document]:
        """The unfinished messages of these ordering keys, one indexed read per status: the
        embedded server plans equality fields and one $in (tests/test_embedded_gaps.py), so
        {orderingKey: {$in}, status: {$in}} read every message the keys ever had there.

        The reads of several statuses share one snapshot, a transaction (the caller's, if it is
        in one): one after the other, a message claimed between them, pending in the first and
        active in the second, was in neither, and two workers held messages of one key at once
        (tests/queue/test_ordering_races.py)."""
        wanted = sorted(set(keys))
        if len(statuses) > 1 and not (session is not None and session.in_transaction):
            found: list[Document] = []

            async def read(snapshot: AsyncClientSession) -> None:
                found[:] = await self._unfinished(
                    wanted, statuses=statuses, session=snapshot, whole=whole
                )

            await mongo.in_transaction(self.collection.database.client, read)
            return found
        fields = None if whole else {"status": 1, "orderingKey": 1, "orderSeq": 1, "availableAt": 1}
        found = []
        for status in statuses:
            found += await self.collection.find(
                {"status": status, "orderingKey": {"$in": wanted}},
                fields,
                session=session,
                batch_size=mongo.MAX_IN_IDS,  # a claim's and other workers': no getMore
            ).to_list()
        return found

    # --- claiming -----------------------------------------------------------------------

    def _claiming(self, *, worker: str, token: str, now: datetime) -> Document:
        return {
            "$set": {
                "status": ACTIVE,
                "claimToken": token,
                "claimedBy": worker,
                "leaseUntil": now + timedelta(seconds=self.config.lease_seconds),
                "updatedAt": now,
            },
            "$inc": {"attempts": 1},
        }

    async def claim(self, *, worker: str) -> Claim | None:
        """Lease the next available message, or None. One indexed find_one_and_update.

        A message found behind an earlier one of its key is parked, with every later pending
        message of that key, and the next one tried, as long as any is available. (It gave up
        after three: a drain then stopped with other keys' messages claimable.)"""
        for _ in range(PARK_ROUNDS):
            now = self.clock()
            token = uuid.uuid4().hex
            document = await self.collection.find_one_and_update(
                {"status": PENDING, "availableAt": {"$lte": now}},
                self._claiming(worker=worker, token=token, now=now),
                sort=[("availableAt", 1)],
                return_document=ReturnDocument.AFTER,
            )
            if document is None:
                return None
            claim = Claim(id=document["_id"], token=token, document=document)
            if claim.ordering_key is None or not await self._behind_earlier(claim):
                return claim
            await self._park(claim)
        return None

    async def claim_many(self, *, worker: str, limit: int) -> list[Claim]:
        """Lease up to ``limit`` available messages under one token: a few commands however
        many (their ids, then one transaction: the update_many, the ordering check or the
        claimed documents read back, the commit), where ``claim`` costs one per message. Messages
        whose claim was lost to a concurrent worker between the first two are simply not in
        the answer. Ordering keys hold as in ``claim``, with one read per status for the whole
        batch. Messages held by another transaction are left for a later claim, not waited
        for (``held_elsewhere``). A batch of one is ``claim`` (one command, where latency
        matters: a revoke races the events of its key), except on a queue whose messages may be
        held: ``claim``'s single write would wait for the holder's commit."""
        self.next_available_at, self.saw_every_pending = None, False
        if limit <= 1 and not self._may_be_held:
            claim = await self.claim(worker=worker)
            return [claim] if claim else []
        for _ in range(PARK_ROUNDS):  # a batch all parked behind earlier messages: again
            found, claims = await self._claim_batch(worker=worker, limit=limit)
            if claims or not found or self._held:
                return claims
        return []

    async def _claim_batch(self, *, worker: str, limit: int) -> tuple[bool, list[Claim]]:
        """(whether any message was available, the claims not parked).

        The messages found held by another transaction before go first: the batch that held
        them has committed by now, or its user's next batch holds them again soon (the consumer
        was woken by the commit's publish into them, and this is the claim's first write).
        Then the next available ones without those still held, until ``limit`` are claimed,
        none is left that is not held, or the budget of transactions is spent."""
        now = self.clock()
        available = {"status": PENDING, "availableAt": {"$lte": now}}
        claiming = _Claiming(worker=worker, token=uuid.uuid4().hex, now=now, available=available)
        held = [{"_id": i, "orderingKey": key} for i, key in self._held.items()]
        found = bool(held)
        try:
            if held:
                self._held.clear()  # what is still held is found held again
                await self._claim_unless_held(
                    claiming, held[:limit], attempts=1,
                    floor=CLAIM_TRANSACTIONS - HELD_RECHECK_TRANSACTIONS, unsorted_are_held=True,
                )  # fmt: skip
                self._remember_held(held[limit:])
            while (room := limit - len(claiming.claims)) > 0 and claiming.budget > 0:
                candidates = await self._candidates(room, now=now)
                if not candidates:
                    break
                found, held_before = True, len(self._held)
                await self._claim_unless_held(claiming, candidates, attempts=CLAIM_ATTEMPTS)
                if len(self._held) == held_before:
                    break  # the rest went to other workers: the caller claims again
        except PyMongoError:
            # A malformed document fails the transaction it is in, but those before it have
            # committed: their claims are ours, handed out, not left to expire.
            if not claiming.claims:
                raise
            log.warning("%s: a claim failed after %d were claimed; sweeping malformed documents",
                        self.name, len(claiming.claims), exc_info=True)  # fmt: skip
            with contextlib.suppress(PyMongoError):
                await self.sweep_malformed()
        for claim in claiming.blocked:
            await self._park(claim)  # after the commit: parking promotes what may go now
        parked = {claim.id for claim in claiming.blocked}
        return found, [claim for claim in claiming.claims if claim.id not in parked]

    async def _candidates(self, room: int, *, now: datetime) -> list[Document]:
        """The next ``room`` pending messages in availableAt order, but not those held (by id),
        and of them the ones available now. The first one not available yet is why this
        pending range is read, not only the available one: its time is ``next_available_at``,
        for the consumer's sleep, in the same command."""
        query: Document = {"status": PENDING, "availableAt": {"$lt": PARKED}}
        if self._held:
            query["_id"] = {"$nin": list(self._held)}
        upcoming = await self.collection.find(
            query,
            {"orderingKey": 1, "dedupeKey": 1, "availableAt": 1},
            sort=[("availableAt", 1)],
            limit=room,
        ).to_list()  # (room > 0: a find's limit 0 is no limit)
        self.saw_every_pending = len(upcoming) < room
        if now.tzinfo is None:  # a clock without tz_aware: the server reads it as UTC
            now = now.replace(tzinfo=UTC)
        ready = []
        for document in upcoming:
            at = _available_at(document)
            if at is not None and at <= now:
                ready.append(document)
            elif at is not None:  # the first not available yet: the rest are later still
                if self.next_available_at is None or at < self.next_available_at:
                    self.next_available_at = at
                break
        return ready

    @property
    def held_elsewhere(self) -> int:
        """How many messages the last claim left because another transaction holds them."""
        return len(self._held)

    def _remember_held(self, documents: list[Document]) -> None:
        for document in documents:
            if len(self._held) >= mongo.MAX_IN_IDS:  # the next claims' $nin stays bounded
                return
            self._held[document["_id"]] = document.get("orderingKey")

    async def _claim_unless_held(
        self,
        claiming: _Claiming,
        candidates: list[Document],
        *,
        attempts: int,
        floor: int = 0,
        unsorted_are_held: bool = False,
    ) -> None:
        """Claim these, all but those a transaction holds: a claim that meets one is cut in two
        until the held ones are alone, and those are left for later (``_held``). While the
        call's budget of transactions is above ``floor``; past it, a part not sorted out yet
        is left to the next claim: as held if it was held before (``unsorted_are_held``),
        else to be found again."""
        if claiming.budget <= floor:
            if unsorted_are_held:
                self._remember_held(candidates)
            return
        claiming.budget -= 1
        try:
            await self._claim_in_one_transaction(claiming, candidates, attempts=attempts)
        except HeldElsewhere:
            if len(candidates) == 1:
                self._remember_held(candidates)
                return
            # A conflict of a part is the held message, not a race: one attempt each.
            half = len(candidates) // 2
            for part in (candidates[:half], candidates[half:]):
                await self._claim_unless_held(
                    claiming, part, attempts=1, floor=floor, unsorted_are_held=unsorted_are_held
                )

    async def _claim_in_one_transaction(
        self, claiming: _Claiming, candidates: list[Document], *, attempts: int
    ) -> None:
        ids = [document["_id"] for document in candidates]
        wanted = set(ids)
        keys = sorted({k for d in candidates if isinstance(k := d.get("orderingKey"), str)})
        # Every candidate keyed: the claimed ones are among the active messages of their keys,
        # and the ordering check's read of those returns them whole, in place of a read-back.
        keyed = len(keys) > 0 and all(isinstance(d.get("orderingKey"), str) for d in candidates)
        # On a queue whose every type is deduplicated by its ordering key (score_refresh), a
        # candidate whose dedupe key is its ordering key was its key's only pending message
        # (the unique partial index, parked ones included): no pending one of its key can be
        # ahead of it, and only the active ones need reading. Not where another type may share
        # the key: its pending message, waiting out a backoff, may be the earlier one.
        one_pending = self._deduped_by_ordering_key and all(map(_one_pending_per_key, candidates))
        statuses = (ACTIVE,) if one_pending else UNFINISHED
        tries = 0

        async def claim_and_check(session: AsyncClientSession) -> tuple[list[Claim], list[Claim]]:
            # One transaction, one commit: the claim, then the ordering check reads the
            # unfinished messages of the candidates' keys (the claimed ones among them, active
            # now, at the same orderSeq), and the claimed documents are read (a coalescing
            # publish may have replaced a payload since the candidates were found), all in one
            # snapshot. The write first: it is what races a watcher batch's hold. A write
            # conflict is a claim that committed first (the next attempt claims what is left)
            # or a message held by a transaction still open (HeldElsewhere once the attempts
            # are spent). A malformed document fails the claim as a whole: nothing is claimed,
            # and the caller sweeps it aside.
            nonlocal tries
            tries += 1
            try:
                result = await self.collection.update_many(
                    {**claiming.available, "_id": {"$in": ids}},
                    self._claiming(worker=claiming.worker, token=claiming.token, now=claiming.now),
                    session=session,
                )
            except OperationFailure as exc:
                if exc.code == WRITE_CONFLICT and tries >= attempts:
                    raise HeldElsewhere(f"{self.name}: {len(ids)} messages") from exc
                raise
            claimed: list[Document] = []
            if keyed:
                unfinished = await self._unfinished(
                    keys, statuses=statuses, session=session, whole=True
                )
                claimed = sorted(
                    (d for d in unfinished if _claimed_by(d, claiming.token, wanted)),
                    key=lambda d: _available_at(d) or PARKED,
                )
            else:
                unfinished = await self._unfinished(keys, session=session) if keys else []
            if len(claimed) != result.modified_count:
                # Not keyed, or a claimed one is not under the key it was found with (its
                # ordering key changed meanwhile: an operator's edit): read them back by id, so
                # that nothing claimed is left out of the answer to sit out its lease.
                claimed = await self.collection.find(
                    {"_id": {"$in": ids}, "claimToken": claiming.token, "status": ACTIVE},
                    sort=[("availableAt", 1)],
                    batch_size=len(ids) + 1,
                    session=session,
                ).to_list()
            claims = [Claim(id=d["_id"], token=claiming.token, document=d) for d in claimed]
            return claims, behind_earlier(claims, unfinished)

        claims, blocked = await mongo.in_transaction(
            self.collection.database.client, claim_and_check
        )
        claiming.claims += claims
        claiming.blocked += blocked

    async def _behind_earlier(self, claim: Claim) -> bool:
        if claim.ordering_key is None:
            return False
        return bool(behind_earlier([claim], await self._unfinished([claim.ordering_key])))

    async def _park(self, claim: Claim) -> None:
        """Claimed out of order (a publish race): wait behind the earlier message again, and
        the rest of its key with it."""
        outcome = await to_pending(
            self.collection,
            claim.owned(),
            {"availableAt": PARKED},
            now=self.clock(),
            inc={"attempts": -1},
        )
        if outcome == "pending":
            metrics.OUTCOMES.labels(self.name, "parked").inc()
        assert claim.ordering_key is not None
        await self._park_followers(claim)
        await self.promote(claim.ordering_key)  # the earlier one may have finished meanwhile

    async def _park_followers(self, claim: Claim) -> None:
        """Every pending message of the key numbered after its earliest unfinished one is
        behind that one too: all parked at once, not found and parked one claim at a time (each
        such park reads the key's unfinished messages: a backlog of N of one key, retried by an
        operator, cost N² reads, and one claim ran past its lease). The filter is the ordering
        index's fields alone: the embedded server scans the collection for any other field in
        it (tests/test_embedded_gaps.py). So it also parks again what is parked, and a message
        waiting out a retry's backoff: promoted in its turn, it goes without the rest of it."""
        assert claim.ordering_key is not None
        unfinished = await self._unfinished([claim.ordering_key])
        first = min((_order_seq(d) for d in unfinished), default=None)
        if first is None:
            return
        now = self.clock()
        await mongo.update_all(
            self.collection,
            {"status": PENDING, "orderingKey": claim.ordering_key, "orderSeq": {"$gt": first}},
            {"$set": {"availableAt": PARKED, "updatedAt": now}},
        )

    async def promote(self, ordering_key: str, *, check_blocking: bool = True) -> bool:
        """Make the next parked message of a key claimable, if nothing else of it is unfinished.

        Right after a message of the key finished, the check can be skipped: if a racing publish
        left another unparked message of the key, the claim-time check parks the follower again.
        """
        statuses = UNFINISHED if check_blocking else (PENDING,)
        for _ in range(3):  # the one chosen was moved meanwhile: look again
            unfinished = await self._unfinished([ordering_key], statuses=statuses)
            if check_blocking and any(not _parked(document) for document in unfinished):
                return False
            parked = [document for document in unfinished if _parked(document)]
            if not parked:
                return False
            if await self._unpark(min(parked, key=_order_seq)):
                return True
        return False

    async def _unpark(self, document: Document) -> bool:
        now = self.clock()
        result = await self.collection.update_one(
            {"_id": document["_id"], "status": PENDING, "availableAt": PARKED},
            {"$set": {"availableAt": now, "updatedAt": now}},
        )
        return result.modified_count == 1

    # --- finishing a claim --------------------------------------------------------------

    async def ack(self, claim: Claim, *, session: AsyncClientSession | None = None) -> bool:
        """Mark done. Inside the handler's transaction, a lost lease raises LeaseLost (abort)."""
        now = self.clock()
        update = {
            "$set": {**_CLAIM_RELEASED["$set"], "status": DONE, "doneAt": now, "updatedAt": now}
        }
        result = await self.collection.update_one(claim.owned(), update, session=session)
        if result.modified_count != 1:
            self._lost_lease(claim, "ack")
            if session is not None:
                raise LeaseLost(f"{self.name} {claim.id}: lease lost before commit")
            return False
        metrics.OUTCOMES.labels(self.name, DONE).inc()
        await self._after_finish(claim, session)
        return True

    async def ack_many(self, claims: list[Claim], *, session: AsyncClientSession) -> None:
        """Mark a batch claimed together done, in the handler's transaction: one update_many.
        If any lease was lost, LeaseLost aborts the transaction (none counts as done)."""
        if not claims:
            return
        now = self.clock()
        tokens = {claim.token for claim in claims}
        if len(tokens) != 1:
            raise ValueError("ack_many acknowledges one claim_many batch (one token)")
        update = {
            "$set": {**_CLAIM_RELEASED["$set"], "status": DONE, "doneAt": now, "updatedAt": now}
        }
        result = await self.collection.update_many(
            {"_id": {"$in": [c.id for c in claims]}, "claimToken": tokens.pop(), "status": ACTIVE},
            update,
            session=session,
        )
        if result.modified_count != len(claims):
            self._lost_lease(claims[0], "ack of a batch")
            raise LeaseLost(f"{self.name}: a lease in a batch of {len(claims)} was lost")
        metrics.OUTCOMES.labels(self.name, DONE).inc(len(claims))

    async def promote_after(self, claims: list[Claim]) -> None:
        """After a batch finished (committed): the next message of each key that has one
        parked may go. One read for the batch; a promotion only where something waits."""
        keys = sorted({c.ordering_key for c in claims if c.ordering_key is not None})
        if not keys:
            return
        next_in_line: dict[str, Document] = {}
        for document in await self._unfinished(keys, statuses=(PENDING,)):
            key = document.get("orderingKey")
            if _parked(document) and isinstance(key, str):
                best = next_in_line.setdefault(key, document)
                if _order_seq(document) < _order_seq(best):
                    next_in_line[key] = document
        for key, document in sorted(next_in_line.items()):
            if not await self._unpark(document):
                await self.promote(key, check_blocking=False)

    async def fail(self, claim: Claim, error: BaseException) -> bool:
        """Retry later with backoff, or dead after maxAttempts."""
        now = self.clock()
        record = error_record(error, now=now, attempt=claim.attempts)
        if claim.attempts >= claim.max_attempts:
            return await self.dead_letter(claim, record)
        delay = backoff_seconds(claim.attempts, self.config)
        retry_at = now + timedelta(seconds=delay)
        fields = {"availableAt": retry_at, "updatedAt": now, "lastError": record}
        outcome = await to_pending(self.collection, claim.owned(), fields, now=now)
        if outcome == "missed":
            self._lost_lease(claim, "fail")
            return False
        if outcome == "superseded":  # a newer message of its key will be handled instead
            await self._after_finish(claim, None)
            return True
        metrics.OUTCOMES.labels(self.name, "retried").inc()
        log.warning(
            "%s message %s failed (attempt %d/%d), retry in %.1fs: %s: %s",
            self.name, claim.id, claim.attempts, claim.max_attempts, delay,
            record["type"], record["message"],
        )  # fmt: skip
        return True

    async def dead_letter(self, claim: Claim, error: BaseException | Document) -> bool:
        now = self.clock()
        record = (
            error
            if isinstance(error, dict)
            else error_record(error, now=now, attempt=claim.attempts)
        )
        update = {
            "$set": {
                **_CLAIM_RELEASED["$set"],
                "status": DEAD,
                "updatedAt": now,
                "lastError": record,
            }
        }
        result = await self.collection.update_one(claim.owned(), update)
        if result.modified_count != 1:
            self._lost_lease(claim, "dead-letter")
            return False
        metrics.OUTCOMES.labels(self.name, DEAD).inc()
        log.error(
            "%s message %s is dead: %s: %s", self.name, claim.id, record["type"], record["message"]
        )
        # A dead message must not block its ordering key forever; the operator can retry it.
        await self._after_finish(claim, None)
        return True

    async def release(self, claim: Claim) -> bool:
        """Give the claim back untouched (graceful shutdown): the attempt does not count."""
        now = self.clock()
        outcome = await to_pending(
            self.collection, claim.owned(), {"availableAt": now}, now=now, inc={"attempts": -1}
        )
        if outcome == "pending":
            metrics.OUTCOMES.labels(self.name, "released").inc()
        elif outcome == "superseded":
            await self._after_finish(claim, None)
        return outcome != "missed"

    async def renew_many(self, claims: list[Claim]) -> int:
        """Renew a batch's leases in one update; how many are still ours."""
        if not claims:
            return 0
        lease_until = self.clock() + timedelta(seconds=self.config.lease_seconds)
        result = await mongo.update_many(
            self.collection,
            {"_id": {"$in": [c.id for c in claims]}, "claimToken": claims[0].token,
             "status": ACTIVE},
            {"$set": {"leaseUntil": lease_until}},
        )  # fmt: skip
        return result.modified_count

    async def renew(self, claim: Claim) -> bool:
        lease_until = self.clock() + timedelta(seconds=self.config.lease_seconds)
        result = await self.collection.update_one(
            claim.owned(), {"$set": {"leaseUntil": lease_until}}
        )
        if result.modified_count != 1:
            self._lost_lease(claim, "renew")
            return False
        return True

    async def _after_finish(self, claim: Claim, session: AsyncClientSession | None) -> None:
        # Inside a transaction the finish is not visible yet: the caller promotes after commit.
        if session is None:
            await self.promote_next(claim)

    async def promote_next(self, claim: Claim) -> None:
        """After a message finished for good: let the next one of its ordering key go."""
        if claim.ordering_key is not None:
            await self.promote(claim.ordering_key, check_blocking=False)

    def _lost_lease(self, claim: Claim, action: str) -> None:
        metrics.OUTCOMES.labels(self.name, "lost_lease").inc()
        log.warning("%s message %s: lease lost, %s rejected", self.name, claim.id, action)

    # --- housekeeping -------------------------------------------------------------------

    async def reap(self) -> int:
        """Return expired claims to pending; dead-letter malformed documents; unblock keys."""
        now = self.clock()
        expired = {"status": ACTIVE, "leaseUntil": {"$lt": now}}
        fields = {"availableAt": now, "updatedAt": now}
        # Messages without a dedupeKey cannot collide on the way back: one update for all.
        result = await mongo.update_many(
            self.collection,
            {**expired, "dedupeKey": {"$exists": False}},
            {"$set": {**_CLAIM_RELEASED["$set"], **fields, "status": PENDING}},
        )
        reaped = result.modified_count
        async for document in self.collection.find(
            {**expired, "dedupeKey": {"$exists": True}}, projection={"_id": 1}
        ):
            query = {**expired, "_id": document["_id"]}
            reaped += await to_pending(self.collection, query, fields, now=now) != "missed"
        if reaped:
            metrics.REAPED.labels(self.name).inc(reaped)
            log.warning("%s: %d expired claims returned to pending", self.name, reaped)
        await self.sweep_malformed()
        for key in await self.collection.distinct(
            "orderingKey", {"status": PENDING, "availableAt": PARKED}
        ):
            if isinstance(key, str):
                await self.promote(key)
        return reaped

    async def sweep_malformed(self) -> int:
        """Documents no claim can ever match (or whose claim would fail) go to dead, not limbo."""
        now = self.clock()
        swept = 0
        for query, reason in MALFORMED:
            record = {
                "type": "MalformedDocument",
                "message": reason,
                "traceback": "",
                "at": now,
                "attempt": None,
            }
            swept += await mongo.update_all(
                self.collection,
                query,
                {"$set": {"status": DEAD, "updatedAt": now, "lastError": record}},
            )
        if swept:
            metrics.OUTCOMES.labels(self.name, DEAD).inc(swept)
            log.error("%s: %d malformed documents moved to dead", self.name, swept)
        return swept


def _only_duplicate_keys(exc: BulkWriteError) -> bool:
    errors = exc.details.get("writeErrors", [])
    return bool(errors) and all(e.get("code") == DUPLICATE_KEY for e in errors)
