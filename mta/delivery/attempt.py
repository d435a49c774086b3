"""One attempt: route a group, read its body right before DATA, send it, settle the replies.

For every group (the recipients of one message at one next hop):

1. the next hop comes from the router; a permanent routing answer (NXDOMAIN, null MX)
   fails the recipients, a temporary one defers them;
2. the body is read right before the transaction goes out; once the content is written,
   "dot pending" is journaled durably right before the final dot (I3), so a process that
   dies later leaves proof that the remote may have the message, and one that died
   before leaves none: its deliveries were certainly not delivered and are retried;
3. each recipient's reply is journaled durably, then the outcome is written to the store
   under the lease (I2: delivered only with a 2xx, failed only with a 5xx or expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from mta.admin.metrics import Metrics
from mta.concurrency import ByteBudget
from mta.config import DeliverySection, UncertainMode
from mta.delivery.body import Body
from mta.delivery.outbound.cache import ConnectionCache
from mta.delivery.outbound.transaction import (
    SETUP_PHASES,
    RecipientResult,
    Source,
    Transaction,
)
from mta.delivery.retry import (
    RetryPolicy,
    classify,
    classify_dns,
    next_attempt_delay,
    reply_lost,
)
from mta.delivery.routing import NextHop, Router
from mta.delivery.settlement import Settlement, Settler
from mta.delivery.shaping import Shaper
from mta.errors import RoutePermFailure, RouteTempFailure, StoreUnavailable
from mta.faults import fault_point
from mta.journal.records import DotPending, JournalError, ReplyReceived
from mta.journal.writer import Journal
from mta.queue.ids import queue_id
from mta.queue.records import AttemptOutcome, ClaimedDelivery, Envelope
from mta.queue.store import Store

log = structlog.get_logger(__name__)

@dataclass(frozen=True)
class Sent:
    """One transaction's replies, before they are settled."""

    deliveries: list[ClaimedDelivery]
    results: list[RecipientResult]
    #: Deliveries to send again at once: a ``452`` to their RCPT after others were taken
    #: (too many recipients); they are not settled with the rest.
    again: list[ClaimedDelivery]
    #: The destination's pushback, if the transaction met any.
    pushback: str | None


class NotSent(Exception):
    """A group failed before anything reached the remote server."""


class BodyCorrupt(NotSent):
    """The stored body does not decode: nothing was sent, and a retry cannot heal it, so
    the group's deliveries are held for the operator rather than deferred."""

    def __init__(self, evidence: str, destination: str) -> None:
        super().__init__(evidence)
        #: The next hop's key (its metrics label).
        self.destination = destination


class JournalDown(NotSent):
    """The journal took no dot-pending record: nothing was sent, and delivery pauses
    (the leases go back unattempted: no deferral, no attempt counted)."""


@dataclass
class Progress:
    """How far one group's attempt got: decides its outcome if the attempt breaks."""

    attempt_id: str = ""
    #: The body is read and the transaction is going out (a stop lets it finish).
    sending: bool = False
    #: "dot pending" is in the journal: the remote may have the message (I3).
    dot_pending: bool = False
    #: Why the journal refused the dot-pending record (the dot was not written).
    journal_error: JournalError | None = None
    #: The deliveries of the transaction going out now.
    current: frozenset[int] = frozenset()
    #: Deliveries whose outcomes were written to the store or held back for it.
    settled: set[int] = dataclasses.field(default_factory=set)
    #: Unix times the transaction started and the dot-pending record was written.
    started_at: float | None = None
    dot_at: float | None = None
    #: When the first transaction started waiting for its destination slot.
    since: float = dataclasses.field(default_factory=time.perf_counter)

    def start_transaction(self, attempt_id: str, delivery_ids: set[int]) -> None:
        """A new transaction of the group begins: nothing of it is pending yet."""
        self.attempt_id, self.current = attempt_id, frozenset(delivery_ids)
        self.dot_pending, self.dot_at, self.started_at = False, None, time.time()


class Attempts:
    """Runs attempts for one process: the deliverer hands it each claimed group."""

    def __init__(self, *, store: Store, router: Router, shaper: Shaper,
                 connections: ConnectionCache, journal: Journal, settler: Settler,
                 policy: RetryPolicy, owner: str, delivery: DeliverySection,
                 sending: ByteBudget, metrics: Metrics, rng: random.Random) -> None:
        """``sending`` bounds the bytes of bodies being sent at once (I4)."""
        self.store = store
        self.router = router
        self.shaper = shaper
        self.connections = connections
        self.journal = journal
        self.settler = settler
        self.policy = policy
        self.owner = owner
        self.delivery = delivery
        self.metrics = metrics
        self.rng = rng
        self._sending = sending

    async def deliver(self, message_id: uuid.UUID, domain: str,
                      deliveries: list[ClaimedDelivery], progress: Progress) -> None:
        """Route, send and settle one group; ``progress`` says how far it got."""
        message = deliveries[0].envelope
        fault_point("delivery.start")
        fault_point(f"delivery.start:{message.message_id_header}")
        try:
            hop = await self.router.next_hop(domain)
        except (RoutePermFailure, RouteTempFailure) as exc:
            # DNS evidence, recorded as DNS evidence: no SMTP server said anything (I2).
            source: Source = ("dns_permanent" if isinstance(exc, RoutePermFailure)
                              else "dns_temporary")
            results = [RecipientResult(d.recipient, 0, exc.evidence, "connect", False, source)
                       for d in deliveries]
            await self._settle(message, deliveries, results, progress, host=domain)
            return
        suspended = self.shaper.suspended(hop.key)
        if suspended is not None:
            # Dead after repeated failures: defer at once, as Postfix does ("delivery
            # temporarily suspended"), rather than hold a task until the cool-off ends.
            results = [RecipientResult(d.recipient, 0,
                                       f"delivery temporarily suspended: {suspended}",
                                       "connect", False, "local") for d in deliveries]
            await self._settle(message, deliveries, results, progress, host=hop.key)
            return
        uncertain_mode = hop.uncertain_mode or self.delivery.uncertain_mode
        limit = hop.recipients_per_transaction or self.delivery.recipients_per_transaction
        pending: list[ClaimedDelivery] = list(deliveries)
        sent: Sent | None = None
        async with self._renewing([d.id for d in deliveries]), self.shaper.slot(hop.key):
            # Every transaction settles at least one delivery, so this ends in time.
            for _ in range(len(deliveries)):
                batch, pending = pending[:limit], pending[limit:]
                sent = await self._transaction(message, hop, batch, progress,
                                               uncertain_mode)
                pending = sent.again + pending
                if not pending or sent.pushback is not None:
                    break
                # More to send on this connection: this transaction's outcomes first.
                await self._settle_sent(message, sent, progress, hop, uncertain_mode)
                sent = None
        # The last transaction is settled after the destination's slot is free, so the
        # store write does not hold up the next send to it.
        if sent is not None:
            await self._settle_sent(message, sent, progress, hop, uncertain_mode)
        if pending:
            # The destination pushed back (no reply, a 421, a 4xx to the session): the
            # rest is not tried on it now, and waits like the failed transaction.
            why = sent.pushback if sent is not None else "too many transactions"
            results = [RecipientResult(d.recipient, 0, f"not sent: an earlier transaction "
                                       f"of this attempt failed: {why}", "connect",
                                       False, "local") for d in pending]
            await self._settle(message, pending, results, progress, host=hop.key)

    async def _settle_sent(self, message: Envelope, sent: Sent, progress: Progress,
                           hop: NextHop, uncertain_mode: UncertainMode) -> None:
        """Settle a transaction's outcomes, but for the deliveries it sends again."""
        resent = {d.recipient for d in sent.again}
        await self._settle(message, [d for d in sent.deliveries if d.recipient not in resent],
                           [r for r in sent.results if r.recipient not in resent],
                           progress, host=hop.key, uncertain_mode=uncertain_mode)

    async def _transaction(self, message: Envelope, hop: NextHop,
                           deliveries: list[ClaimedDelivery], progress: Progress,
                           uncertain_mode: UncertainMode) -> Sent:
        """One SMTP transaction for ``deliveries``, not yet settled (``progress`` holds
        its journal state until it is)."""
        progress.start_transaction(uuid.uuid4().hex, {d.id for d in deliveries})
        body = Body(self.store, message, self._sending)
        ids = {d.recipient: d.id for d in deliveries}

        async def before_data() -> None:
            await body.load()
            progress.sending = True

        async def before_dot(accepted: list[str]) -> None:
            at = time.time()
            try:
                await self.journal.append_durable(DotPending(
                    progress.attempt_id, tuple(ids[rcpt] for rcpt in accepted),
                    str(message.id), hop.hosts[0].name if hop.hosts else hop.key,
                    at, uncertain_mode))
            except JournalError as exc:
                progress.journal_error = exc
                raise
            progress.dot_pending, progress.dot_at = True, at
            fault_point("delivery.after_dot_pending")

        label = self.metrics.attempted(hop.key)
        session_since = time.perf_counter()
        try:
            async with self.connections.session(hop) as conn:
                results = await conn.send(
                    Transaction(message.mail_from, [d.recipient for d in deliveries],
                                body.chunks()),
                    before_data=before_data, before_dot=before_dot)
        finally:
            body.release()
            self.metrics.delivery_send_seconds.labels(label).observe(
                time.perf_counter() - session_since)
        if body.unavailable is not None:
            # The body could not be read right before DATA: certainly not sent.
            raise NotSent(f"store unavailable before the attempt ({body.unavailable})")
        if body.corrupt is not None:
            raise BodyCorrupt(str(body.corrupt), hop.key)
        if progress.journal_error is not None:
            raise JournalDown(f"the journal is down: {progress.journal_error}")
        self.metrics.delivery_attempt_seconds.labels(label).observe(
            time.perf_counter() - progress.since)
        progress.since = time.perf_counter()
        if any(r.code == 0 and r.source == "smtp" for r in results):
            self.metrics.delivery_timeouts.labels(label).inc()
        pushback = destination_pushback(results)
        if pushback is not None:
            self.shaper.record_failure(hop.key, pushback)
        elif any(r.source == "smtp" and r.phase in ("rcpt", "data_end") for r in results):
            self.shaper.record_success(hop.key)  # the transaction got to its recipients
        again = too_many_recipients(deliveries, results)
        if again:
            log.info("delivery.too_many_recipients", queue_id=queue_id(message.id),
                     destination=deliveries[0].next_hop, sent=len(deliveries) - len(again),
                     again=len(again))
        return Sent(deliveries, results, again, pushback)

    @contextlib.asynccontextmanager
    async def _renewing(self, ids: list[int]) -> AsyncIterator[None]:
        """Renew the leases on ``ids`` every third of the lease while a send runs."""
        lease = self.delivery.lease_seconds
        period = lease / 3

        async def renew() -> None:
            while True:
                await asyncio.sleep(period)
                with contextlib.suppress(StoreUnavailable):
                    await self.store.renew_leases(self.owner, ids, lease)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _settle(self, message: Envelope, deliveries: Sequence[ClaimedDelivery],
                      results: Sequence[RecipientResult], progress: Progress, *,
                      host: str, uncertain_mode: UncertainMode = "uncertain") -> None:
        """Journal the replies, decide each outcome, write it, and bounce what failed."""
        by_recipient = {r.recipient: r for r in results}
        attempt_id = progress.attempt_id if progress.dot_pending else None
        if attempt_id is not None:
            try:
                await asyncio.gather(*(self.journal.append_durable(ReplyReceived(
                    attempt_id, d.id, by_recipient[d.recipient].code,
                    by_recipient[d.recipient].text, by_recipient[d.recipient].data_sent,
                    time.time())) for d in deliveries))
            except JournalError as exc:
                # The store is the record now; should it be down too and the process
                # die, the dot pending without a reply makes the delivery uncertain.
                log.warning("delivery.reply_not_journaled", queue_id=queue_id(message.id),
                            error=str(exc))
            fault_point("delivery.after_reply_journaled")
        age = (datetime.now(UTC) - message.received_at).total_seconds()
        ended_at = time.time()
        outcomes = [dataclasses.replace(
            self._outcome(d, by_recipient[d.recipient], age, uncertain_mode), host=host or None,
            started_at=progress.started_at, dot_at=progress.dot_at,
            reply_lost_at=ended_at if reply_lost(by_recipient[d.recipient].code,
                                                  by_recipient[d.recipient].data_sent) else None)
            for d in deliveries]
        failed = [by_recipient[d.recipient] for d, o in zip(deliveries, outcomes, strict=True)
                  if o.state == "failed"]
        await self.settler.apply(Settlement(attempt_id or "", outcomes, message, failed, host))
        progress.settled.update(d.id for d in deliveries)
        label = self.metrics.destination(host)
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            self.metrics.delivery_outcomes.labels(outcome.state, label).inc()
            if outcome.possible_duplicate:
                self.metrics.delivery_possible_duplicates.labels(label).inc()
            if outcome.state == "delivered":
                self.metrics.delivery_accept_to_delivered_seconds.observe(age)
                self.metrics.delivery_last_success.set(time.time())
            elif outcome.state == "deferred":
                self.metrics.delivery_deferred.labels(
                    defer_reason(by_recipient[delivery.recipient])).inc()
            log.info("delivery.outcome", queue_id=queue_id(message.id),
                     message_id=message.message_id_header, delivery_id=delivery.id,
                     destination=delivery.next_hop, attempt=delivery.attempts + 1,
                     recipient=delivery.recipient, state=outcome.state,
                     reply=outcome.reply, host=host)

    def _outcome(self, delivery: ClaimedDelivery, result: RecipientResult, age: float,
                 uncertain_mode: UncertainMode) -> AttemptOutcome:
        retry_in = next_attempt_delay(self.policy, delivery.attempts + 1, self.rng)
        if result.source in ("dns_permanent", "dns_temporary"):
            decision = classify_dns(result.source == "dns_permanent", age=age,
                                    policy=self.policy)
            return AttemptOutcome(delivery.id, decision.outcome, None,
                                  f"DNS: {result.text} ({decision.reason})", retry_in)
        decision = classify(result.code, result.data_sent, age=age, policy=self.policy,
                            uncertain_mode=uncertain_mode,
                            before_mail=result.phase in SETUP_PHASES)
        return AttemptOutcome(delivery.id, decision.outcome, result.code or None,
                              f"{result.reply} ({decision.reason}, {result.phase})", retry_in,
                              decision.possible_duplicate)


def too_many_recipients(deliveries: Sequence[ClaimedDelivery],
                        results: Sequence[RecipientResult]) -> list[ClaimedDelivery]:
    """The deliveries whose RCPT got ``452`` while others of the same transaction went
    out with the data: the server takes no more recipients per transaction (RFC 5321
    4.5.3.1.10), so they go in the next one. A ``452`` with no recipient taken is the
    server's trouble and is deferred as any ``4xx``."""
    if not any(r.phase == "data_end" for r in results):
        return []
    refused = {r.recipient for r in results if r.phase == "rcpt" and r.code == 452}
    return [d for d in deliveries if d.recipient in refused]


def defer_reason(result: RecipientResult) -> str:
    """Why a delivery was deferred, as a ``mta_delivery_deferred_total`` label."""
    if result.source in ("dns_permanent", "dns_temporary"):
        return "dns"
    if result.source == "local":
        return "suspended" if result.text.startswith("delivery temporarily suspended") \
            else "other"
    if result.code == 0:
        return "no_reply"
    return "reply_4xx" if 400 <= result.code < 500 else "other"


def destination_pushback(results: Sequence[RecipientResult]) -> str | None:
    """The evidence that a destination is unwell or pushing back, or None (DESIGN.md,
    Destination feedback): no reply (a failed connection, a timeout, a broken session),
    a ``421``, or a ``4xx`` to the connection, the greeting, the session's setup, MAIL or
    the DATA command. A reply about one recipient (RCPT) or one message (the reply to
    its dot), any ``5xx``, and our own refusals say nothing about its health (Postfix's
    concurrency feedback counts connection-level trouble only)."""
    for result in results:
        if result.source != "smtp":
            continue
        code = result.code
        if code in (0, 421) or (400 <= code < 500 and result.phase not in ("rcpt", "data_end")):
            return result.reply
    return None
