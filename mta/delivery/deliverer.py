"""Delivery: claim due work, route it, send it, and record only what can be proven.

One :class:`Deliverer` per node process. Each round claims a batch of due deliveries
(leased to this process), groups them by message and recipient domain (one SMTP
transaction carries all recipients of a message for one next hop), and sends the
groups concurrently within the shaper's limits. For every group:

1. the next hop comes from the router; a permanent routing answer (NXDOMAIN, null MX)
   fails the recipients, a temporary one defers them;
2. right before DATA, "attempt started" is journaled durably (I3), so a process that dies
   later leaves proof that the data may have been sent;
3. each recipient's reply is journaled durably, then the outcome is written to the store
   under the lease (I2: delivered only with a 2xx, failed only with a 5xx or expiry);
4. when the store is down, outcomes wait in memory and in the journal and are written
   when it returns; a process that died is replayed from its journal at the next start
   (:func:`recover`).

Failed recipients of a message with a non-null sender get one DSN (RFC 3464), queued as
a new message from the null sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog

from mta.admin.metrics import Metrics
from mta.concurrency import ByteBudget
from mta.config import Settings
from mta.delivery.dsn import FailedRecipient, build_dsn
from mta.delivery.outbound.session import (
    SETUP_PHASES,
    ClientTimeouts,
    ConnectionCache,
    RecipientResult,
    Transaction,
)
from mta.delivery.retry import RetryPolicy, UncertainMode, classify, next_attempt_delay, status_for
from mta.delivery.routing import ResolverConfig, RouteConfig, Router
from mta.delivery.shaping import Shaper, ShapingConfig
from mta.errors import RoutePermFailure, RouteTempFailure, StoreUnavailable
from mta.faults import fault_point
from mta.journal.writer import (
    Applied,
    AttemptStarted,
    Journal,
    JournalError,
    PendingAttempt,
    ReplyReceived,
    adopt,
    owner_alive,
)
from mta.queue import ClaimedDelivery, NewMessage, Store
from mta.queue.ids import new_message_id, queue_id
from mta.queue.outcome_batch import OutcomeBatcher
from mta.queue.store import AttemptOutcome, Envelope, FinalOrRetry

log = structlog.get_logger(__name__)

_OWNER_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def process_owner(node_name: str) -> str:
    """This process's lease and journal owner: node name, pid and start time."""
    return f"{owner_prefix(node_name)}{os.getpid()}-{time.time_ns() // 1_000_000}"


def owner_prefix(node_name: str) -> str:
    """The prefix every owner of ``node_name`` starts with."""
    return f"{_OWNER_UNSAFE.sub('_', node_name)}-"


#: Bytes of a body handed to the SMTP client at a time.
BODY_CHUNK_BYTES = 64 * 1024
#: Bytes of a body read for the headers a DSN returns (never the whole body).
DSN_HEADERS_MAX_BYTES = 64 * 1024


class _Body:
    """A message's content, read only right before DATA and held only while it is written.

    ``load`` takes the message's size from the process's sending budget (``workers`` times
    the largest message size), then reads the body: the bodies in memory for delivery
    never pass that budget (I4), whatever the number of sessions waiting for a slow
    server, while many small messages go out at once. The bytes are given back as soon
    as the content has been handed to the connection (before the reply to the dot,
    which a hung server may never send), or when the attempt ends.
    """

    def __init__(self, store: Store, envelope: Envelope, sending: ByteBudget) -> None:
        self._store = store
        self._message_id = envelope.id
        self._size = envelope.size_bytes
        self._sending = sending
        self._holding = 0
        self._content: tuple[bytes, bytes] | None = None
        #: Why the body could not be read (the attempt stopped before DATA).
        self.unavailable: StoreUnavailable | None = None

    async def load(self) -> None:
        """Take the body's size from the sending budget, then read it; raises if the store
        cannot give it."""
        self._holding = await self._sending.acquire(self._size)
        try:
            content = await self._store.message_content(self._message_id)
        except StoreUnavailable as exc:
            self.unavailable = exc
            raise
        if content is None:
            raise LookupError("the message is gone from the store")
        self._content = content

    async def chunks(self) -> AsyncIterator[bytes]:
        """The trace headers, then the body in bounded slices; its bytes are freed after."""
        try:
            if self._content is None:
                raise LookupError("the body was not loaded before DATA")
            trace, body = self._content
            yield trace
            view = memoryview(body)
            for start in range(0, len(view), BODY_CHUNK_BYTES):
                yield bytes(view[start:start + BODY_CHUNK_BYTES])
        finally:
            self.release()

    def release(self) -> None:
        """Drop the content and give its bytes back to the budget (once)."""
        self._content = None
        if self._holding:
            self._sending.release(self._holding)
            self._holding = 0


class _NotSent(Exception):
    """A group failed before anything reached the remote server."""


#: Seconds the claim loop waits after an unexpected error before it claims again.
ROUND_RETRY_S = 1.0


@dataclass
class _Settlement:
    """Outcomes to write together, with the DSN that their failures owe the sender."""

    #: The journaled attempt they settle ("" when none started).
    attempt_id: str
    outcomes: list[AttemptOutcome]
    message: Envelope | None = None
    failed: list[RecipientResult] = field(default_factory=list)
    host: str = ""


@dataclass
class _Progress:
    """How far one group's attempt got: decides its outcome if the attempt breaks."""

    attempt_id: str = ""
    #: "attempt started" is in the journal: the data may have reached the remote.
    started: bool = False
    #: The outcomes were written to the store or held back for it.
    settled: bool = False


@dataclass(frozen=True)
class DeliveryOptions:
    """How the deliverer claims and retries."""

    batch_size: int = 50
    workers: int = 8
    max_message_size: int = 20 * 1024 * 1024
    max_tasks: int = 200
    #: Groups per destination domain in hand at once; claims skip a domain that has
    #: this many, so a slow or hung destination cannot fill ``max_tasks`` and starve
    #: the others.
    per_destination_tasks: int = 20
    lease_seconds: float = 300.0
    poll_interval: float = 5.0
    uncertain_mode: UncertainMode = "uncertain"
    reporting_mta: str = "localhost"


class Deliverer:
    """Claims, sends and records deliveries for one node process."""

    def __init__(self, *, store: Store, router: Router, shaper: Shaper,
                 connections: ConnectionCache, journal: Journal, policy: RetryPolicy,
                 owner: str, options: DeliveryOptions, metrics: Metrics,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.router = router
        self.shaper = shaper
        self.connections = connections
        self.journal = journal
        self.policy = policy
        self.owner = owner
        self._outcomes = OutcomeBatcher(store, owner)
        self.options = options
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.wake = asyncio.Event()
        #: Settlements that wait for the store (their replies are in the journal).
        self._unapplied: list[_Settlement] = []
        self._held_back_lock = asyncio.Lock()
        #: Bytes of bodies being sent at once: ``workers`` of the largest size (I4).
        self._sending = ByteBudget(options.workers * options.max_message_size)
        #: Each running group's task, with its progress and delivery ids.
        self._groups: dict[asyncio.Task[None], tuple[_Progress, set[int]]] = {}
        #: Groups being sent (or waiting to be) per destination domain.
        self._per_domain: Counter[str] = Counter()
        #: Set when a claim failed midway: it may have committed without our knowing.
        self._orphans_possible = False

    async def close(self) -> None:
        """Cancel sends still running (they keep journal records and leases), then close."""
        tasks = list(self._groups)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.connections.close()
        await self.journal.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and dispatch until ``stop``; then wait for the sends in flight.

        Sends run as tasks, so a slow destination holds only its own slots: the loop goes
        on claiming for the others while at most ``max_tasks`` groups are outstanding.
        """
        while not stop.is_set():
            if len(self._groups) > self.options.max_tasks - self.options.batch_size:
                # Wait for room for a whole batch rather than claim a sliver of one.
                await _first_of(list(self._groups), stop, timeout=None)
                continue
            # Cleared before the round, not after: a wake-up during it is not lost.
            self.wake.clear()
            try:
                handled = await self.run_once()
            except StoreUnavailable as exc:
                log.warning("delivery.store_unavailable", error=str(exc))
                handled = 0
            except Exception:
                # A bug must not stop delivery for good while intake goes on accepting.
                log.exception("delivery.round_failed")
                await _first_of([], stop, timeout=ROUND_RETRY_S)
                continue
            if handled:
                continue
            await _first_of([], stop, self.wake, timeout=self.options.poll_interval)
        await self._give_back_unstarted()
        if self._groups:
            await asyncio.wait(list(self._groups))

    async def _give_back_unstarted(self) -> None:
        """At stop: cancel the groups whose attempt has not started and return their
        leases unattempted, so a restart neither waits for them nor counts them as
        in flight at a crash (the crash-loop breaker)."""
        unstarted = {task: ids for task, (progress, ids) in self._groups.items()
                     if not progress.started}
        for task in unstarted:
            task.cancel()
        await asyncio.gather(*unstarted, return_exceptions=True)
        ids = [i for group in unstarted.values() for i in group]
        if ids:
            with contextlib.suppress(StoreUnavailable):  # then the next start releases them
                await self.store.give_back(self.owner, ids)
            log.info("delivery.unstarted_given_back", count=len(ids))

    async def run_once(self) -> int:
        """Apply held-back outcomes, claim a batch and dispatch its groups. Returns its size."""
        await self._apply_held_back()
        cap = self.options.per_destination_tasks
        full = [domain for domain, count in self._per_domain.items() if count >= cap]
        try:
            claimed = await self.store.claim_due(self.owner, self.options.batch_size,
                                                 self.options.lease_seconds, full)
        except StoreUnavailable:
            self._orphans_possible = True
            raise
        groups: dict[tuple[uuid.UUID, str], list[ClaimedDelivery]] = defaultdict(list)
        for delivery in claimed:
            groups[(delivery.message_id, delivery.next_hop)].append(delivery)
        for (message_id, domain), deliveries in groups.items():
            ids = {d.id for d in deliveries}
            self._per_domain[domain] += 1
            progress = _Progress()
            task = asyncio.create_task(self._deliver_logged(message_id, domain, deliveries,
                                                            progress))
            self._groups[task] = (progress, ids)
            task.add_done_callback(partial(self._finished, domain))
        return len(claimed)

    def _finished(self, domain: str, task: asyncio.Task[None]) -> None:
        self._groups.pop(task, None)
        if self._per_domain[domain] >= self.options.per_destination_tasks:
            self.wake.set()  # it has room again: its due mail can be claimed now
        self._per_domain[domain] -= 1
        if not self._per_domain[domain]:
            del self._per_domain[domain]

    async def _deliver_logged(self, message_id: uuid.UUID, domain: str,
                              deliveries: list[ClaimedDelivery], progress: _Progress) -> None:
        try:
            await self._deliver(message_id, domain, deliveries, progress)
        except _NotSent as exc:
            # Nothing was sent: give the leases back (now, or when the store returns).
            log.warning("delivery.not_sent", queue_id=queue_id(message_id), error=str(exc))
            self._unapplied.append(_Settlement("", [AttemptOutcome(
                d.id, "deferred", None, f"not sent: {exc}", self.policy.minimal_backoff)
                for d in deliveries]))
        except Exception as exc:
            log.exception("delivery.group_failed", queue_id=queue_id(message_id),
                          domain=domain)
            if progress.settled:
                return
            # Decide as a journal replay would: once the attempt started, the data may
            # have arrived, so the deliveries are uncertain; before that, not sent.
            state: FinalOrRetry = "uncertain" if progress.started else "deferred"
            reason = (f"internal error after the attempt started: {exc!r}" if progress.started
                      else f"not sent: internal error: {exc!r}")
            self._unapplied.append(_Settlement(
                progress.attempt_id if progress.started else "",
                [AttemptOutcome(d.id, state, None, reason, self.policy.minimal_backoff)
                 for d in deliveries]))
            self.wake.set()  # the claim loop writes held-back outcomes first

    async def _deliver(self, message_id: uuid.UUID, domain: str,
                       deliveries: list[ClaimedDelivery], progress: _Progress) -> None:
        message = deliveries[0].envelope
        fault_point("delivery.start")
        fault_point(f"delivery.start:{message.message_id_header}")
        try:
            hop = await self.router.next_hop(domain)
        except (RoutePermFailure, RouteTempFailure) as exc:
            permanent = isinstance(exc, RoutePermFailure)
            code = 550 if permanent else 451
            results = [RecipientResult(d.recipient, code, f"{code} {exc.evidence}", "connect",
                                       False) for d in deliveries]
            await self._settle(message, deliveries, results, progress, host=domain)
            return
        suspended = self.shaper.suspended(hop.key)
        if suspended is not None:
            # Dead after repeated failures: defer at once, as Postfix does ("delivery
            # temporarily suspended"), rather than hold a task until the cool-off ends.
            results = [RecipientResult(d.recipient, 0,
                                       f"delivery temporarily suspended: {suspended}",
                                       "connect", False) for d in deliveries]
            await self._settle(message, deliveries, results, progress, host=hop.key)
            return
        progress.attempt_id = uuid.uuid4().hex
        body = _Body(self.store, message, self._sending)

        async def before_data() -> None:
            await body.load()
            await self.journal.append_durable(AttemptStarted(
                progress.attempt_id, tuple(d.id for d in deliveries), str(message_id),
                hop.hosts[0].name if hop.hosts else hop.key, time.time()))
            progress.started = True
            fault_point("delivery.after_attempt_started")

        sending_since = time.perf_counter()
        async with self._renewing([d.id for d in deliveries]), self.shaper.slot(hop.key):
            try:
                async with self.connections.session(hop) as conn:
                    results = await conn.send(
                        Transaction(message.mail_from, [d.recipient for d in deliveries],
                                    body.chunks()),
                        before_data=before_data)
            finally:
                body.release()
        if body.unavailable is not None:
            # The body could not be read right before DATA: certainly not sent.
            raise _NotSent(f"store unavailable before the attempt ({body.unavailable})")
        self.metrics.delivery_attempt_seconds.labels(hop.key).observe(
            time.perf_counter() - sending_since)
        if any(r.code == 0 for r in results):
            self.metrics.delivery_timeouts.labels(hop.key).inc()
        if any(r.code and 200 <= r.code < 500 for r in results):
            self.shaper.record_success(hop.key)
        else:
            self.shaper.record_failure(hop.key, results[0].text if results else "")
        await self._settle(message, deliveries, results, progress, host=hop.key,
                           uncertain_mode=hop.uncertain_mode or self.options.uncertain_mode)

    @contextlib.asynccontextmanager
    async def _renewing(self, ids: list[int]) -> AsyncIterator[None]:
        """Renew the leases on ``ids`` every third of the lease while a send runs."""
        period = self.options.lease_seconds / 3

        async def renew() -> None:
            while True:
                await asyncio.sleep(period)
                with contextlib.suppress(StoreUnavailable):
                    await self.store.renew_leases(self.owner, ids, self.options.lease_seconds)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _settle(self, message: Envelope, deliveries: Sequence[ClaimedDelivery],
                      results: Sequence[RecipientResult], progress: _Progress, *,
                      host: str, uncertain_mode: UncertainMode = "uncertain") -> None:
        """Journal the replies, decide each outcome, write it, and bounce what failed."""
        by_recipient = {r.recipient: r for r in results}
        attempt_id = progress.attempt_id if progress.started else None
        if attempt_id is not None:
            await asyncio.gather(*(self.journal.append_durable(ReplyReceived(
                attempt_id, d.id, by_recipient[d.recipient].code,
                by_recipient[d.recipient].text, by_recipient[d.recipient].data_sent,
                time.time())) for d in deliveries))
            fault_point("delivery.after_reply_journaled")
        age = (datetime.now(UTC) - message.received_at).total_seconds()
        outcomes = [self._outcome(d, by_recipient[d.recipient], age, uncertain_mode)
                    for d in deliveries]
        failed = [by_recipient[d.recipient] for d, o in zip(deliveries, outcomes, strict=True)
                  if o.state == "failed"]
        await self._apply(_Settlement(attempt_id or "", outcomes, message, failed, host))
        progress.settled = True
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            self.metrics.delivery_outcomes.labels(outcome.state, host).inc()
            if outcome.possible_duplicate:
                self.metrics.delivery_possible_duplicates.labels(host).inc()
            log.info("delivery.outcome", queue_id=queue_id(message.id), delivery=delivery.id,
                     recipient=delivery.recipient, state=outcome.state,
                     reply=outcome.reply, host=host)

    def _outcome(self, delivery: ClaimedDelivery, result: RecipientResult, age: float,
                 uncertain_mode: UncertainMode) -> AttemptOutcome:
        decision = classify(result.code, result.data_sent, age=age, policy=self.policy,
                            uncertain_mode=uncertain_mode,
                            before_mail=result.phase in SETUP_PHASES)
        retry_in = next_attempt_delay(self.policy, delivery.attempts + 1, self.rng)
        reply = result.text if result.code == 0 or result.text.startswith(str(result.code)) \
            else f"{result.code} {result.text}"
        return AttemptOutcome(delivery.id, decision.outcome, result.code or None,
                              f"{reply} ({decision.reason}, {result.phase})", retry_in,
                              decision.possible_duplicate)

    async def _apply(self, settlement: _Settlement) -> None:
        """Write ``settlement`` now, or hold it back until the store returns."""
        try:
            await self._write(settlement)
        except StoreUnavailable as exc:
            log.warning("delivery.outcome_held_back", error=str(exc),
                        count=len(settlement.outcomes))
            self._unapplied.append(settlement)

    async def _write(self, settlement: _Settlement) -> None:
        """Outcomes and the DSN their failures owe, in one transaction; then ``Applied``."""
        bounce = None
        if settlement.message is not None and settlement.failed:
            bounce = await bounce_for(self.store, settlement.message, settlement.failed,
                                      remote_mta=settlement.host,
                                      reporting_mta=self.options.reporting_mta)
        if bounce is None:
            await self._outcomes.write(settlement.outcomes)
        else:
            await self.store.record_outcomes(self.owner, settlement.outcomes, bounce=bounce)
        if bounce is not None:
            self.wake.set()
        if settlement.attempt_id:
            with contextlib.suppress(JournalError):
                self.journal.append(Applied(settlement.attempt_id, time.time()))

    async def _apply_held_back(self) -> None:
        """Write settlements that waited for the store; they are in the journal meanwhile.

        After a claim failed midway, leases this process holds but is not working on
        were claimed without our knowing: nothing was sent for them, so they are
        deferred back to the queue.
        """
        async with self._held_back_lock:
            while self._unapplied:
                await self._write(self._unapplied[0])
                self._unapplied.pop(0)
            if self._orphans_possible:
                # Only after every held-back outcome is written: those leases are ours too.
                owned = await self.store.lease_owners(_like_literal(self.owner))
                # Read the in-memory sets after the query: a send may have finished during
                # it, leaving its outcome held back rather than in flight.
                held_back = {o.delivery_id for settlement in self._unapplied
                             for o in settlement.outcomes}
                in_flight = {i for _, ids in self._groups.values() for i in ids}
                orphans = sorted(set(owned.get(self.owner, [])) - in_flight - held_back)
                if orphans:
                    await self.store.record_outcomes(self.owner, [AttemptOutcome(
                        i, "deferred", None, "claimed while the store failed; not sent", 0.0)
                        for i in orphans])
                    log.warning("delivery.orphan_leases_released", count=len(orphans))
                self._orphans_possible = False


async def bounce_for(store: Store, message: Envelope, failed: Sequence[RecipientResult],
                     *, remote_mta: str, reporting_mta: str) -> NewMessage | None:
    """The DSN (RFC 3464) owed to ``message``'s sender for its ``failed`` recipients.

    None for the null sender (never a bounce to a bounce), or when the message is gone.
    The DSN is a new message from the null sender; the caller commits it with the
    failures (``Store.record_outcomes(..., bounce=...)``).
    """
    if not message.mail_from:
        return None
    head = await store.message_head(message.id, DSN_HEADERS_MAX_BYTES)
    if head is None:
        return None
    trace, body_head = head
    text = trace + body_head
    end = text.find(b"\r\n\r\n")
    # Past the limit, the headers end at the last whole line read.
    headers = text[:end + 2] if end >= 0 else text[:text.rfind(b"\r\n") + 2]
    now = datetime.now(UTC)
    dsn = build_dsn(
        reporting_mta=reporting_mta, original_sender=message.mail_from,
        original_headers=headers, arrival_date=message.received_at,
        queue_id=queue_id(message.id), now=now,
        failures=[FailedRecipient(
            recipient=r.recipient, status=status_for(r.code, r.text), action="failed",
            remote_mta=remote_mta, diagnostic=_diagnostic(r), last_attempt=now)
            for r in failed])
    if dsn is None:
        return None
    return NewMessage(
        id=new_message_id(), mail_from="", recipients=[message.mail_from], trace_headers=b"",
        body=dsn, client_address="127.0.0.1", helo_name=reporting_mta, auth_user=None,
        message_id_header=None)


async def _first_of(tasks: list[asyncio.Task[None]], *events: asyncio.Event,
                    timeout: float | None) -> None:
    """Wait until a task ends, an event is set, or ``timeout`` passes."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait([*tasks, *waiters], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _like_literal(text: str) -> str:
    """``text`` as a LIKE pattern that matches only itself."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _diagnostic(result: RecipientResult) -> str:
    """The remote reply as a DSN Diagnostic-Code (``smtp; 550 5.1.1 …``)."""
    if not result.code:
        return f"X-mta-fleet; {result.text}"
    text = result.text if result.text.startswith(str(result.code)) \
        else f"{result.code} {result.text}"
    return f"smtp; {text}"


@dataclass(frozen=True)
class RecoveryReport:
    """What a start-up replay did."""

    applied: int
    uncertain: int
    released: int


async def recover(store: Store, journal_dir: Path, node_name: str, policy: RetryPolicy, *,
                  crash_limit: int = 3, crash_window_s: float = 3600.0,
                  reporting_mta: str = "localhost") -> RecoveryReport:
    """Replay dead processes' journals, then requeue what they leased but never sent.

    An attempt with replies is applied as the replies say, a failure with its DSN; a
    delivery whose attempt started without a reply becomes ``uncertain`` (the data may
    have arrived). A delivery a dead process leased with no attempt journaled was
    certainly not sent.
    """
    adoption = await asyncio.to_thread(adopt, journal_dir)
    applied = uncertain = 0
    try:
        attempts: list[PendingAttempt] = [*adoption.pending.replied,
                                          *adoption.pending.unanswered]
        for attempt in attempts:
            outcomes = [_replayed(reply, policy) for reply in attempt.replies]
            outcomes += [AttemptOutcome(delivery_id, "uncertain", None,
                                        "process died after the attempt started; "
                                        "no reply was recorded (journal replay)")
                         for delivery_id in attempt.missing]
            bounce = await _replayed_bounce(store, attempt, outcomes, reporting_mta)
            done = await store.record_outcomes(attempt.owner, outcomes, bounce=bounce)
            applied += len(done)
            uncertain += len(set(attempt.missing) & done)
        adoption.commit()
    finally:
        adoption.close()
    released = 0
    for owner, ids in (await store.lease_owners(owner_prefix(node_name) + "%")).items():
        if not owner_alive(journal_dir, owner):
            released += len(await store.release_unsent(
                owner, ids, "lease of a process that died before sending: no attempt "
                            "was journaled, so the message was certainly not sent",
                crash_limit=crash_limit, crash_window_s=crash_window_s))
    return RecoveryReport(applied, uncertain, released)


async def _replayed_bounce(store: Store, attempt: PendingAttempt,
                           outcomes: Sequence[AttemptOutcome],
                           reporting_mta: str) -> NewMessage | None:
    """The DSN owed for the failures a replayed attempt records, if any."""
    failed = {o.delivery_id for o in outcomes if o.state == "failed"}
    if not failed:
        return None
    message = await store.message(uuid.UUID(attempt.started.message_id))
    if message is None:
        return None
    recipients = {d.id: d.recipient for d in await store.deliveries(message.id)}
    results = [RecipientResult(recipients[r.delivery_id], r.code, r.text, "data_end",
                               r.data_sent)
               for r in attempt.replies if r.delivery_id in failed and r.delivery_id in recipients]
    return await bounce_for(store, message.envelope, results,
                            remote_mta=attempt.started.host, reporting_mta=reporting_mta)


def _replayed(reply: ReplyReceived, policy: RetryPolicy) -> AttemptOutcome:
    decision = classify(reply.code, reply.data_sent, age=0.0, policy=policy)
    return AttemptOutcome(reply.delivery_id, decision.outcome, reply.code or None,
                          f"{reply.text} ({decision.reason}, journal replay)",
                          policy.minimal_backoff, decision.possible_duplicate)


async def start_delivery(settings: Settings, store: Store, metrics: Metrics) -> Deliverer:
    """Replay dead processes' journals, then build this process's deliverer."""
    config = settings.delivery
    policy = RetryPolicy(minimal_backoff=config.minimal_backoff,
                         maximal_backoff=config.maximal_backoff,
                         max_lifetime=config.max_lifetime)
    journal_dir = Path(settings.node.data_dir) / "journal"
    journal_dir.mkdir(parents=True, exist_ok=True)
    owner = process_owner(settings.node.name)
    journal = await asyncio.to_thread(Journal.open, journal_dir, owner)
    ehlo = config.ehlo_name or settings.smtp.hostname
    report = await recover(store, journal_dir, settings.node.name, policy,
                           crash_limit=config.crash_loop_limit,
                           crash_window_s=config.crash_loop_window, reporting_mta=ehlo)
    log.info("delivery.recovered", owner=owner, applied=report.applied,
             uncertain=report.uncertain, released=report.released)
    routes = [RouteConfig(route.domain, route.host, route.port, route.tls, route.username,
                          route.password, route.uncertain_mode) for route in config.routes]
    router = Router(routes, ResolverConfig(config.nameservers, config.dns_port,
                                           config.dns_timeout, config.mx_port))
    shaper = Shaper(ShapingConfig(
        max_connections_per_destination=config.max_connections_per_destination,
        initial_window=min(5, config.max_connections_per_destination),
        messages_per_minute=config.messages_per_minute,
        global_concurrency=config.global_concurrency))
    connections = ConnectionCache(
        ehlo_name=ehlo, max_messages_per_connection=config.connection_reuse_limit,
        max_idle=config.connection_idle_timeout, timeouts=ClientTimeouts(
            connect=config.connect_timeout, greeting=config.greeting_timeout,
            mail=config.mail_timeout, rcpt=config.rcpt_timeout,
            data_init=config.data_init_timeout, data_block=config.data_block_timeout,
            data_end=config.data_end_timeout))
    return Deliverer(
        store=store, router=router, shaper=shaper, connections=connections, journal=journal,
        policy=policy, owner=owner, metrics=metrics,
        options=DeliveryOptions(batch_size=config.batch_size,
                                workers=settings.node.workers,
                                max_message_size=int(settings.smtp.max_message_size),
                                max_tasks=8 * config.batch_size,
                                per_destination_tasks=max(
                                    4 * config.max_connections_per_destination,
                                    config.batch_size),
                                lease_seconds=config.lease_seconds,
                                poll_interval=config.poll_interval,
                                uncertain_mode=config.uncertain_mode, reporting_mta=ehlo))
