"""The claim loop: claim due work, dispatch each group as a task, record what it proves.

One :class:`Deliverer` per node process. Each round writes held-back settlements
(``settlement.py``), claims a batch of due deliveries (leased to this process), groups
them by message and route (one SMTP transaction carries a message's recipients at one
domain, or at every domain one static route takes), and runs each group's attempt
(``attempt.py``) as a task within the shaper's limits. When the store is down, outcomes
wait in memory and in the journal and are written when it returns; a process that died
is replayed from its journal at the next start (``recovery.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter, defaultdict
from functools import partial

import structlog

from mta.admin.metrics import Metrics
from mta.concurrency import ByteBudget
from mta.config import Settings
from mta.delivery.attempt import Attempts, BodyCorrupt, JournalDown, NotSent, Progress
from mta.delivery.outbound.cache import ConnectionCache
from mta.delivery.retry import RetryPolicy
from mta.delivery.routing import Router
from mta.delivery.settlement import Settlement, Settler
from mta.delivery.shaping import Shaper
from mta.errors import StoreUnavailable
from mta.journal.writer import Journal
from mta.queue.ids import queue_id
from mta.queue.records import AttemptOutcome, ClaimedDelivery
from mta.queue.store import Store

log = structlog.get_logger(__name__)

#: Suspects of the crash-loop breaker worked through alone at one start, at most.
MAX_SUSPECTS_PER_START = 1000
#: Seconds the claim loop waits after an unexpected error before it claims again.
ROUND_RETRY_S = 1.0
#: Groups in hand at once, in claim batches: the loop claims while fewer are outstanding.
TASKS_PER_BATCH = 8
#: Groups per destination in hand at once, in windows of
#: ``max_connections_per_destination`` (at least one batch).
TASKS_PER_DESTINATION_WINDOW = 4


class Deliverer:
    """Claims, sends and records deliveries for one node process."""

    def __init__(self, *, settings: Settings, store: Store, router: Router, shaper: Shaper,
                 connections: ConnectionCache, journal: Journal, policy: RetryPolicy,
                 owner: str, metrics: Metrics, rng: random.Random | None = None) -> None:
        delivery = settings.delivery
        self.store = store
        self.router = router
        self.connections = connections
        self.journal = journal
        self.policy = policy
        self.owner = owner
        self.delivery = delivery
        self.wake = asyncio.Event()
        self._max_tasks = TASKS_PER_BATCH * delivery.batch_size
        #: Groups per destination domain in hand at once; a claim takes no more than a
        #: domain's room under this, so a slow or hung destination cannot fill
        #: ``max_tasks`` and starve the others.
        self._per_destination_tasks = max(
            TASKS_PER_DESTINATION_WINDOW * delivery.max_connections_per_destination,
            delivery.batch_size)
        self.settler = Settler(store=store, journal=journal, owner=owner,
                               reporting_mta=settings.ehlo_name,
                               wake=self.wake, metrics=metrics)
        self.attempts = Attempts(
            store=store, router=router, shaper=shaper, connections=connections,
            journal=journal, settler=self.settler, policy=policy, owner=owner,
            delivery=delivery, metrics=metrics, rng=rng or random.Random(),
            # Bytes of bodies being sent at once: ``workers`` of the largest size (I4).
            sending=ByteBudget(settings.node.workers * int(settings.smtp.max_message_size)))
        #: Each running group's task, with its progress and delivery ids.
        self._groups: dict[asyncio.Task[None], tuple[Progress, set[int]]] = {}
        #: Groups being sent (or waiting to be) per destination domain.
        self._per_domain: Counter[str] = Counter()
        #: A group found the journal refusing records: pause a round before claiming.
        self._journal_trouble = False
        #: Set by the node while its mode is isolated: nothing is claimed.
        self.isolated = False
        self._metrics = metrics

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
        suspects_done = False
        while not stop.is_set():
            self._metrics.delivery_heartbeat.set(time.time())
            if self.isolated:
                # An isolated node claims and sends nothing (I8); its mail stays as it is.
                # What already happened is still written down: outcomes the store
                # missed while it was down, and leases a failed claim left behind
                # (nothing was sent for those), so that reroute can move them.
                with contextlib.suppress(StoreUnavailable):
                    await self.settler.apply_held_back(self._in_flight)
                self._metrics.delivery_paused_rounds.labels("isolated").inc()
                await _first_of([], stop, self.wake, timeout=self.delivery.poll_interval)
                self.wake.clear()
                continue
            if not suspects_done:
                await self._work_through_suspects(stop)
                suspects_done = True
            if not self._journal_works():
                # Pause (I3: no dot without its record), and try the journal again later.
                await _first_of([], stop, timeout=self.delivery.poll_interval)
                continue
            if len(self._groups) > self._max_tasks - self.delivery.batch_size:
                # Wait for room for a whole batch rather than claim a sliver of one (a
                # poll interval at most, so the heartbeat shows the loop is alive).
                await _first_of(list(self._groups), stop, timeout=self.delivery.poll_interval)
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
            await _first_of([], stop, self.wake, timeout=self.delivery.poll_interval)
        await self._give_back_unstarted()
        if self._groups:
            await asyncio.wait(list(self._groups))

    async def _work_through_suspects(self, stop: asyncio.Event) -> None:
        """The crash-loop breaker (DESIGN.md): before other work, send each suspect (a
        delivery in flight at ``crash_loop_limit - 1`` deaths) alone, one at a time. A
        death now is pinned on the one in flight, which recovery then holds; one that
        comes through is cleared, and the others go back to work."""
        crashes = max(1, self.delivery.crash_loop_limit - 1)
        for _ in range(MAX_SUSPECTS_PER_START):
            if stop.is_set():
                return
            try:
                suspect = await self.store.claim_suspect(
                    self.owner, self.delivery.lease_seconds, crashes,
                    self.delivery.crash_loop_window)
            except StoreUnavailable:
                return  # the claim loop deals with the store
            if suspect is None:
                return
            log.warning("delivery.crash_suspect_alone", delivery=suspect.id,
                        queue_id=queue_id(suspect.message_id))
            progress = Progress()
            await self._deliver_logged(suspect.message_id, suspect.next_hop, [suspect],
                                       progress)
            with contextlib.suppress(StoreUnavailable):
                await self.store.exonerate(suspect.id)

    def _journal_works(self) -> bool:
        """Whether the journal takes records (resuming it in a new segment after a
        failure, such as a full disk that has room again)."""
        trouble, self._journal_trouble = self._journal_trouble, False
        if self.journal.failed is None:
            return not trouble
        if self.journal.resume():
            log.warning("delivery.journal_resumed")
            return True
        return False

    async def _give_back_unstarted(self) -> None:
        """At stop: cancel the groups whose attempt has not started and return their
        leases unattempted, so a restart neither waits for them nor counts them as
        in flight at a crash (the crash-loop breaker)."""
        unstarted = {task: ids for task, (progress, ids) in self._groups.items()
                     if not progress.sending}
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
        await self.settler.apply_held_back(self._in_flight)
        cap = self._per_destination_tasks
        room = {domain: cap - count for domain, count in self._per_domain.items()}
        try:
            claimed = await self.store.claim_due(self.owner, self.delivery.batch_size,
                                                 self.delivery.lease_seconds, room)
        except StoreUnavailable:
            self.settler.orphans_possible = True
            raise
        groups: dict[tuple[uuid.UUID, str], list[ClaimedDelivery]] = defaultdict(list)
        for delivery in claimed:
            key = self.router.transaction_key(delivery.next_hop)
            groups[(delivery.message_id, key)].append(delivery)
        for (message_id, _), deliveries in groups.items():
            ids = {d.id for d in deliveries}
            domains = frozenset(d.next_hop for d in deliveries)
            self._per_domain.update(domains)
            progress = Progress()
            task = asyncio.create_task(self._deliver_logged(
                message_id, deliveries[0].next_hop, deliveries, progress))
            self._groups[task] = (progress, ids)
            task.add_done_callback(partial(self._finished, domains))
        return len(claimed)

    def _in_flight(self) -> set[int]:
        """The deliveries of the groups running now."""
        return {i for _, ids in self._groups.values() for i in ids}

    def _finished(self, domains: frozenset[str], task: asyncio.Task[None]) -> None:
        self._groups.pop(task, None)
        for domain in domains:
            if self._per_domain[domain] >= self._per_destination_tasks:
                self.wake.set()  # it has room again: its due mail can be claimed now
            self._per_domain[domain] -= 1
            if not self._per_domain[domain]:
                del self._per_domain[domain]

    async def _deliver_logged(self, message_id: uuid.UUID, domain: str,
                              deliveries: list[ClaimedDelivery], progress: Progress) -> None:
        try:
            await self.attempts.deliver(message_id, domain, deliveries, progress)
        except JournalDown as exc:
            # Nothing was sent and delivery pauses: the leases go back unattempted.
            log.warning("delivery.journal_down", queue_id=queue_id(message_id), error=str(exc))
            self._journal_trouble = True
            with contextlib.suppress(StoreUnavailable):  # else the next start releases them
                await self.store.give_back(self.owner, [d.id for d in deliveries])
        except BodyCorrupt as exc:
            # Nothing was sent, and retrying cannot help: held for the operator (I3b).
            log.error("delivery.body_corrupt", queue_id=queue_id(message_id), error=str(exc))
            left = [d for d in deliveries if d.id not in progress.settled]
            self.settler.hold_back(Settlement("", [AttemptOutcome(
                d.id, "held", None, f"held, nothing sent: {exc} (mta queue show; "
                "release it once the body is restored, or delete it)") for d in left]))
            self._metrics.delivery_outcomes.labels(
                "held", self._metrics.destination(exc.destination)).inc(len(left))
            self.wake.set()  # the claim loop writes held-back outcomes first
        except NotSent as exc:
            # Nothing was sent: give the leases back (now, or when the store returns).
            log.warning("delivery.not_sent", queue_id=queue_id(message_id), error=str(exc))
            self.settler.hold_back(Settlement("", [AttemptOutcome(
                d.id, "deferred", None, f"not sent: {exc}", self.policy.minimal_backoff)
                for d in deliveries]))
        except Exception as exc:
            log.exception("delivery.group_failed", queue_id=queue_id(message_id),
                          domain=domain)
            left = [d for d in deliveries if d.id not in progress.settled]
            if not left:
                return
            # Decide as a journal replay would: once the dot is pending, the message may
            # have arrived, so the transaction's deliveries are uncertain; before that,
            # and for the group's transactions not yet begun, not sent.
            pending = progress.current if progress.dot_pending else frozenset()
            self.settler.hold_back(Settlement(
                progress.attempt_id if progress.dot_pending else "",
                [AttemptOutcome(d.id, "uncertain", None,
                                f"internal error after the dot was pending: {exc!r}")
                 if d.id in pending else
                 AttemptOutcome(d.id, "deferred", None, f"not sent: internal error: {exc!r}",
                                self.policy.minimal_backoff)
                 for d in left]))
            self.wake.set()  # the claim loop writes held-back outcomes first


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
