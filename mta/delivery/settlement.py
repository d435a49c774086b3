"""Settlement: write an attempt's outcomes under the lease, with the DSN its failures owe.

Outcomes are written at once (group-committed with other settlements when no DSN is
owed), or held back in memory while the store is down; their replies are in the journal
meanwhile, so a process that dies with settlements held back loses nothing. Held-back
settlements are written first in every claim round.

Failed recipients of a message with a non-null sender get one DSN (RFC 3464), queued as
a new message from the null sender in the same transaction as the failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from mta.admin.metrics import Metrics
from mta.delivery.dsn import FailedRecipient, build_dsn
from mta.delivery.outbound.transaction import RecipientResult
from mta.delivery.owner import like_literal
from mta.delivery.retry import status_for
from mta.errors import StoreRejected, StoreUnavailable
from mta.journal.records import Applied, JournalError
from mta.journal.writer import Journal
from mta.mail.text import outside_text
from mta.queue.ids import new_message_id, queue_id
from mta.queue.outcome_batch import OutcomeBatcher
from mta.queue.records import AttemptOutcome, Envelope, NewMessage, SetAside
from mta.queue.store import Store

log = structlog.get_logger(__name__)

#: Bytes of a body read for the headers a DSN returns (never the whole body).
DSN_HEADERS_MAX_BYTES = 64 * 1024


@dataclass
class Settlement:
    """Outcomes to write together, with the DSN that their failures owe the sender."""

    #: The journaled attempt they settle ("" when none started).
    attempt_id: str
    outcomes: list[AttemptOutcome]
    message: Envelope | None = None
    failed: list[RecipientResult] = field(default_factory=list)
    host: str = ""


class Settler:
    """Writes one process's settlements, holding them back while the store is down."""

    def __init__(self, *, store: Store, journal: Journal, owner: str, reporting_mta: str,
                 wake: asyncio.Event, metrics: Metrics) -> None:
        """``wake`` is set when a written settlement queued a DSN (new work)."""
        self._metrics = metrics
        self._store = store
        self._journal = journal
        self._owner = owner
        self._reporting_mta = reporting_mta
        self._wake = wake
        self._outcomes = OutcomeBatcher(store, owner)
        #: Settlements that wait for the store (their replies are in the journal).
        self._unapplied: list[Settlement] = []
        self._held_back_lock = asyncio.Lock()
        #: Set when a claim failed midway: it may have committed without our knowing.
        self.orphans_possible = False

    def hold_back(self, settlement: Settlement) -> None:
        """Keep ``settlement`` for the next claim round (the store is down, or it must be
        written after the ones before it)."""
        self._unapplied.append(settlement)

    async def apply(self, settlement: Settlement) -> None:
        """Write ``settlement`` now, or hold it back until the store returns."""
        try:
            await self._write(settlement)
        except StoreUnavailable as exc:
            log.warning("delivery.outcome_held_back", error=str(exc),
                        count=len(settlement.outcomes))
            self._unapplied.append(settlement)

    async def _write(self, settlement: Settlement) -> None:
        """Outcomes and the DSN their failures owe, in one transaction; then ``Applied``."""
        bounce = None
        if settlement.message is not None and settlement.failed:
            bounce = await bounce_for(self._store, settlement.message, settlement.failed,
                                      remote_mta=settlement.host,
                                      reporting_mta=self._reporting_mta)
        try:
            if bounce is None:
                await self._outcomes.write(settlement.outcomes)
            else:
                await self._store.record_outcomes(self._owner, settlement.outcomes,
                                                  bounce=bounce)
        except StoreRejected as exc:
            await self._set_aside(settlement, exc)
        else:
            if bounce is not None:
                self._wake.set()
        if settlement.attempt_id:
            with contextlib.suppress(JournalError):
                self._journal.append(Applied(settlement.attempt_id, time.time()))

    async def _set_aside(self, settlement: Settlement, error: StoreRejected) -> None:
        """Keep outcomes the store refused, raw, and make their deliveries uncertain (I3b):
        one bad reply costs its deliveries, never the other outcomes or the node."""
        ids = tuple(o.delivery_id for o in settlement.outcomes)
        record_id = await self._store.set_aside(SetAside(
            source="settlement", owner=self._owner, attempt_id=settlement.attempt_id or "-",
            delivery_ids=ids, reason=outside_text(str(error)),
            raw=raw_evidence([dataclasses.asdict(o) for o in settlement.outcomes])))
        self._metrics.records_set_aside.labels("settlement").inc()
        log.warning("delivery.outcome_set_aside", set_aside=record_id, deliveries=list(ids),
                    error=outside_text(str(error)))

    async def apply_held_back(self, in_flight: Callable[[], set[int]]) -> None:
        """Write settlements that waited for the store; they are in the journal meanwhile.

        After a claim failed midway, leases this process holds but is not working on
        (``in_flight`` names the deliveries it is working on) were claimed without our
        knowing: nothing was sent for them, so they are deferred back to the queue.
        """
        async with self._held_back_lock:
            while self._unapplied:
                await self._write(self._unapplied[0])
                self._unapplied.pop(0)
            if self.orphans_possible:
                # Only after every held-back outcome is written: those leases are ours too.
                owned = await self._store.lease_owners(like_literal(self._owner))
                # Read the in-memory sets after the query: a send may have finished during
                # it, leaving its outcome held back rather than in flight.
                held_back = {o.delivery_id for settlement in self._unapplied
                             for o in settlement.outcomes}
                orphans = sorted(set(owned.get(self._owner, [])) - in_flight() - held_back)
                if orphans:
                    await self._store.record_outcomes(self._owner, [AttemptOutcome(
                        i, "deferred", None, "claimed while the store failed; not sent", 0.0)
                        for i in orphans])
                    log.warning("delivery.orphan_leases_released", count=len(orphans))
                self.orphans_possible = False


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
            recipient=r.recipient, status=_status(r), action="failed",
            remote_mta=None if r.source.startswith("dns") else remote_mta,
            diagnostic=_diagnostic(r), last_attempt=now)
            for r in failed])
    if dsn is None:
        return None
    return NewMessage(
        id=new_message_id(), mail_from="", recipients=[message.mail_from], trace_headers=b"",
        body=dsn, client_address="127.0.0.1", helo_name=reporting_mta, auth_user=None,
        message_id_header=None)


def raw_evidence(records: Sequence[object]) -> bytes:
    """``records`` as JSON bytes, every character kept (lone surrogates escaped, not lost)."""
    return json.dumps(records, ensure_ascii=True, sort_keys=True).encode("ascii")


def _status(result: RecipientResult) -> str:
    """The RFC 3463 status of a failure: the server's own, or what a DNS answer means
    (RFC 7505's 5.1.10 for a null MX, 5.1.2 for a domain that does not exist, 4.4.3 for a
    lookup that kept failing until the lifetime ran out)."""
    if result.source == "dns_permanent":
        return "5.1.10" if "null MX" in result.text else "5.1.2"
    if result.source == "dns_temporary":
        return "4.4.3"
    return status_for(result.code, result.text)


def _diagnostic(result: RecipientResult) -> str:
    """The evidence as a DSN Diagnostic-Code: the remote reply (``smtp; 550 5.1.1 …``), a
    DNS answer (``X-DNS; …``), or our own words (``X-mta-fleet; …``), never a reply the
    remote did not send (I2)."""
    if result.source in ("dns_permanent", "dns_temporary"):
        return f"X-DNS; {result.text}"
    if not result.code:
        return f"X-mta-fleet; {result.text}"
    return f"smtp; {result.reply}"
