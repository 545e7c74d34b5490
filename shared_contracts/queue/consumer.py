"""The consumer loop: claim, handle, ack, with bounded concurrency (SPEC section 3).

It keeps claiming without sleeping while claims succeed; when the queue is empty it sleeps until a
change stream reports new work or the poll interval passes. Change-stream errors fall back to
polling. ``stop()`` is the graceful path: in-flight handlers finish (or, after the grace period,
their claims are released). Cancelling ``run()`` is a crash: nothing is released, and the leases
expire so another worker takes the messages over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import PyMongoError

from shared_contracts.messages import Message
from shared_contracts.queue.documents import PENDING, InvalidMessage, parse_message
from shared_contracts.queue.engine import Claim, Queue
from shared_contracts.request_context import NO_REQUEST, REQUEST_ID
from shared_contracts.wakeup import Wakeup

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delivery:
    """One claimed message, as a handler sees it."""

    message: Message
    claim: Claim
    queue: Queue
    acked: bool = False

    async def ack(self, *, session: AsyncClientSession) -> None:
        """Ack inside the handler's own transaction: its effects and the ack commit together.
        Raises LeaseLost (aborting the transaction) if another worker owns the message now."""
        await self.queue.ack(self.claim, session=session)
        self.acked = True


Handler = Callable[[Delivery], Awaitable[None]]
#: Handles a batch claimed together in one transaction, acking it with ``ack_all``.
BatchHandler = Callable[[list[Delivery]], Awaitable[None]]


async def ack_all(deliveries: list[Delivery], *, session: AsyncClientSession) -> None:
    """Ack a batch inside the handler's transaction: one update for all of it; LeaseLost (and
    the transaction aborts) if any of its leases was lost."""
    if not deliveries:
        return
    await deliveries[0].queue.ack_many([d.claim for d in deliveries], session=session)
    for delivery in deliveries:
        delivery.acked = True


#: Wake on what can make a message claimable: an insert, a return to pending, a new availableAt,
#: a publish into a pending one (the commit of a batch that held it: Queue.held_elsewhere).
WAKE_PIPELINE: list[dict[str, Any]] = [
    {
        "$match": {
            "$or": [
                {"operationType": "insert"},
                {"updateDescription.updatedFields.status": PENDING},
                {"updateDescription.updatedFields.availableAt": {"$exists": True}},
                {"updateDescription.updatedFields.payloadSeq": {"$exists": True}},
            ]
        }
    }
]

#: How soon a consumer looks again while a message it found is held by another transaction (a
#: watcher batch holds a user's refresh until it commits, usually well under a second; a batch
#: that changed nothing of that user publishes nothing that would wake the consumer).
HELD_RECHECK_SECONDS = 0.2


#: The least a consumer sleeps for a message about to become available (clocks are not exact).
SHORTEST_SLEEP_SECONDS = 0.01


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Consumer:
    """``handler`` handles one message. With ``batch_handler``, up to ``batch_size`` available
    messages are claimed together and handled in one call (one transaction); if that call
    fails, each message of the batch is handled on its own by ``handler``, so one bad message
    fails alone."""

    def __init__(
        self,
        queue: Queue,
        handler: Handler,
        *,
        worker: str | None = None,
        batch_handler: BatchHandler | None = None,
        batch_size: int = 1,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.batch_handler = batch_handler
        self.batch_size = batch_size if batch_handler is not None else 1
        self.config = queue.config
        self.worker = worker or worker_id()
        self.wakeup = Wakeup(
            queue.collection,
            WAKE_PIPELINE,
            poll_interval_seconds=self.config.poll_interval_seconds,
            use_change_streams=self.config.use_change_streams,
            read_interval_seconds=self.config.stream_read_interval_seconds,
        )
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._release_on_cancel = False
        self._grace = 10.0

    async def run(self) -> None:
        background = [
            asyncio.create_task(self._reap_forever()),
            asyncio.create_task(self.wakeup.watch_forever()),
        ]
        try:
            await self._claim_forever()
            await self._drain()
        finally:
            for task in (*background, *self._in_flight):
                task.cancel()
            await asyncio.gather(*background, *self._in_flight, return_exceptions=True)

    async def drain(self) -> int:
        """Handle messages (a claim at a time) until none is available (tests, operator
        commands)."""
        handled = 0
        while claims := await self.queue.claim_many(worker=self.worker, limit=self.batch_size):
            await self._handle_claims(claims)
            handled += len(claims)
        return handled

    def stop(self, *, grace_seconds: float = 10.0) -> None:
        """Stop claiming; let in-flight handlers finish within the grace period."""
        self._grace = grace_seconds
        self._stopping.set()
        self.wakeup.set()

    @property
    def change_stream_active(self) -> bool:
        return self.wakeup.active

    async def _claim_forever(self) -> None:
        slots = asyncio.Semaphore(self.config.concurrency)
        while not self._stopping.is_set():
            await slots.acquire()
            self.wakeup.clear()  # before the claim: a wake-up during it is not lost
            claims = await self._try_claim()
            if not claims:
                slots.release()
                await self.wakeup.wait(self._idle_seconds())
                continue
            task = asyncio.create_task(self._handle_claims(claims))
            self._in_flight.add(task)

            def finished(task: asyncio.Task[None]) -> None:
                self._in_flight.discard(task)
                slots.release()

            task.add_done_callback(finished)
            if self._nothing_left():
                # The claim read every pending message: claiming again now would find nothing
                # (a command per batch). Wait for news instead; what came since the claim
                # began has set the wake-up already, and ends this wait at once.
                await self.wakeup.wait(self._idle_seconds())

    def _nothing_left(self) -> bool:
        """Whether the last claim left nothing to claim until a change is reported: it read the
        whole pending range, held nothing back, and a change stream is there to report."""
        return self.queue.saw_every_pending and not self.queue.held_elsewhere and self.wakeup.active

    def _idle_seconds(self) -> float:
        """How long to sleep when nothing was claimable: the poll interval, but a message held
        by another transaction is looked at again soon, and one pending but not available yet
        (a retry's backoff, a burst's delayed refresh: no change wakes anyone then) when its
        time comes."""
        seconds = self.config.poll_interval_seconds
        if self.queue.held_elsewhere:
            seconds = min(seconds, HELD_RECHECK_SECONDS)
        upcoming = self.queue.next_available_at
        if upcoming is not None:
            due = (upcoming - self.queue.clock()).total_seconds()
            seconds = min(seconds, max(due, SHORTEST_SLEEP_SECONDS))
        return seconds

    async def _try_claim(self) -> list[Claim]:
        if self._stopping.is_set():
            return []
        try:
            return await self.queue.claim_many(worker=self.worker, limit=self.batch_size)
        except PyMongoError as exc:
            # A malformed document can make the claim itself fail; sweep it aside and go on.
            log.warning("%s: claim failed (%s); sweeping malformed documents", self.queue.name, exc)
            with contextlib.suppress(PyMongoError):
                await self.queue.sweep_malformed()
            return []

    async def _handle_claims(self, claims: list[Claim]) -> None:
        # Its logs carry the id of the HTTP request that published it (a batch's: all of them).
        ids = sorted({str(c.document.get("requestId") or NO_REQUEST) for c in claims})
        token = REQUEST_ID.set(",".join(ids[:5]) + (f",+{len(ids) - 5}" if len(ids) > 5 else ""))
        try:
            if self.batch_handler is None:
                for claim in claims:
                    delivery = await self._deliverable(claim)
                    if delivery is not None:
                        await self._handle_delivery(delivery)
            else:
                await self._handle_batch(self.batch_handler, claims)
        finally:
            REQUEST_ID.reset(token)

    async def _deliverable(self, claim: Claim) -> Delivery | None:
        """The claim as a delivery, or None once it was moved to dead (unreadable, or its leases
        kept expiring: a handler that crashes the worker)."""
        try:
            message = parse_message(claim.document, self.queue.types)
        except InvalidMessage as exc:
            await self.queue.dead_letter(claim, exc)
            return None
        if claim.attempts > claim.max_attempts:
            await self.queue.dead_letter(
                claim, RuntimeError("maxAttempts exceeded: leases expired")
            )
            return None
        return Delivery(message=message, claim=claim, queue=self.queue)

    async def _handle_batch(self, handler: BatchHandler, claims: list[Claim]) -> None:
        #: The claims not finished yet and not handed to a handler of their own: renewed
        #: together, and released together if the worker stops.
        waiting = list(claims)
        renewer = asyncio.create_task(self._renew_batch_forever(waiting))
        try:
            deliveries = []
            for claim in claims:
                delivery = await self._deliverable(claim)
                if delivery is None:
                    waiting.remove(claim)
                else:
                    deliveries.append(delivery)
            if not deliveries:
                return
            try:
                await handler(deliveries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: a batch of %d failed (%s: %s); each message is handled on its own",
                            self.queue.name, len(deliveries), type(exc).__name__, exc)  # fmt: skip
                for delivery in deliveries:  # its transaction did not commit: nothing was acked
                    delivery.acked = False
                    waiting.remove(delivery.claim)  # renewed by its own handling now
                    await self._handle_delivery(delivery)
                return
            waiting.clear()
            await self.queue.promote_after([d.claim for d in deliveries if d.acked])
            for delivery in deliveries:
                if not delivery.acked:
                    await self.queue.ack(delivery.claim)
        except asyncio.CancelledError:
            if self._release_on_cancel:
                await asyncio.shield(self._release_all(list(waiting)))
            raise
        finally:
            renewer.cancel()

    async def _release_all(self, claims: list[Claim]) -> None:
        for claim in claims:
            await self.queue.release(claim)

    async def _renew_batch_forever(self, claims: list[Claim]) -> None:
        """Renew the claims in ``claims`` (a list the batch shrinks as it goes)."""
        while True:
            await asyncio.sleep(self.config.renew_every_seconds)
            if not claims:
                continue
            try:
                await self.queue.renew_many(list(claims))
            except PyMongoError as exc:
                log.warning("%s: lease renewal of a batch failed: %s", self.queue.name, exc)

    async def _handle_delivery(self, delivery: Delivery) -> None:
        claim = delivery.claim
        renewer = asyncio.create_task(self._renew_forever(claim))
        try:
            await self.handler(delivery)
        except asyncio.CancelledError:
            if self._release_on_cancel:
                await asyncio.shield(self.queue.release(claim))
            raise
        except Exception as exc:
            await self.queue.fail(claim, exc)
        else:
            if delivery.acked:
                await self.queue.promote_next(claim)  # its transaction has committed now
            else:
                await self.queue.ack(claim)
        finally:
            renewer.cancel()

    async def _renew_forever(self, claim: Claim) -> None:
        while True:
            await asyncio.sleep(self.config.renew_every_seconds)
            try:
                if not await self.queue.renew(claim):
                    return
            except PyMongoError as exc:
                log.warning("%s: lease renewal of %s failed: %s", self.queue.name, claim.id, exc)

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight), timeout=self._grace)
        if pending:
            log.warning("%s: releasing %d unfinished claims", self.queue.name, len(pending))
            self._release_on_cancel = True
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _reap_forever(self) -> None:
        while True:
            try:
                await self.queue.reap()
            except PyMongoError as exc:
                log.warning("%s: reaper failed: %s", self.queue.name, exc)
            await asyncio.sleep(self.config.reap_every_seconds)
