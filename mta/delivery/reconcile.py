"""Reconcile: run start-up's recovery for a node's dead processes, and say per delivery
what is certainly delivered, certainly not delivered, and uncertain (DESIGN.md I3).

Recovery changes only leases of owners whose journal lock nobody holds, under the
node's owner prefix, so it never touches a live process's work nor a reroute's
(``reroute:…`` owners cannot match a prefix, see ``owner_prefix``). What it settled is
settled once: a second run finds nothing new and reports three empty lists.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mta.config import Settings
from mta.delivery.recovery import Decision, RecoveryReport, recover
from mta.delivery.retry import RetryPolicy
from mta.journal.files import journal_identity
from mta.queue.ids import queue_id
from mta.queue.records import DeliveryListing, DeliveryRecord
from mta.queue.store import Store

log = structlog.get_logger(__name__)


def journal_dir(settings: Settings) -> Path:
    """The node's journal directory: ``<data_dir>/journal``, shared by its processes."""
    return Path(settings.node.data_dir) / "journal"


async def recover_node(store: Store, settings: Settings, identity: str) -> RecoveryReport:
    """Start-up's recovery for this node: its journal directory, policy and breaker."""
    config = settings.delivery
    return await recover(store, journal_dir(settings), settings.node.name,
                         RetryPolicy.from_settings(config), identity=identity,
                         crash_limit=config.crash_loop_limit,
                         crash_window_s=config.crash_loop_window,
                         reporting_mta=settings.ehlo_name)


@dataclass(frozen=True)
class Reconciled:
    """One delivery a reconcile settled, as the store holds it now."""

    delivery_id: int
    message_id: uuid.UUID | None
    recipient: str | None
    #: Its state in the store now (it may have moved on since, e.g. requeued and sent).
    state: str
    reply_code: int | None
    #: The last reply the store recorded (a delivered or failed one's remote reply).
    reply: str | None
    #: What recovery decided on: the replayed reply, or why it requeued or doubts.
    evidence: str
    #: For one certainly not delivered: ``failed`` (a 5xx), ``requeued`` or ``held``.
    how: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON object with the queue id beside the message id."""
        message = self.message_id
        return {"delivery_id": self.delivery_id,
                "queue_id": queue_id(message) if message is not None else None,
                "message_id": str(message) if message is not None else None,
                "recipient": self.recipient, "state": self.state,
                "reply_code": self.reply_code, "reply": self.reply,
                "evidence": self.evidence, **({"how": self.how} if self.how else {})}


@dataclass(frozen=True)
class ReconcileReport:
    """What one reconcile settled, in three lists, and how many records it set aside."""

    delivered: tuple[Reconciled, ...] = ()
    not_delivered: tuple[Reconciled, ...] = ()
    uncertain: tuple[Reconciled, ...] = ()
    #: Attempts the store refused and journals that could not be read, kept for the
    #: operator (``mta queue set-aside``); their deliveries are in ``uncertain``.
    set_aside: int = 0

    @property
    def changed(self) -> bool:
        """False when the run found nothing to settle."""
        return bool(self.delivered or self.not_delivered or self.uncertain or self.set_aside)

    def counts(self) -> dict[str, int]:
        """How many deliveries each list holds, and the records set aside."""
        return {"delivered": len(self.delivered), "not_delivered": len(self.not_delivered),
                "uncertain": len(self.uncertain), "set_aside": self.set_aside}

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object (``POST /v1/reconcile`` answers it)."""
        return {"changed": self.changed,
                "delivered": [entry.to_json() for entry in self.delivered],
                "not_delivered": [entry.to_json() for entry in self.not_delivered],
                "uncertain": [entry.to_json() for entry in self.uncertain],
                "set_aside": self.set_aside}


async def reconcile(store: Store, settings: Settings) -> ReconcileReport:
    """Recover the node's dead processes (journals replayed, leases released or made
    uncertain), then report each delivery that changed with its state now."""
    directory = journal_dir(settings)
    identity = await asyncio.to_thread(_identity, directory)
    leased = await _leased(store)
    recovered = await recover_node(store, settings, identity)
    current: dict[uuid.UUID, dict[int, DeliveryRecord]] = {}
    for decision in recovered.decisions:
        listing = leased.get(decision.delivery_id)
        if listing is not None and listing.message_id not in current:
            current[listing.message_id] = {
                d.id: d for d in await store.deliveries(listing.message_id)}
    lists: dict[str, list[Reconciled]] = {"delivered": [], "not_delivered": [],
                                          "uncertain": []}
    for decision in recovered.decisions:
        listing = leased.get(decision.delivery_id)
        now = (current[listing.message_id].get(decision.delivery_id)
               if listing is not None else None)
        where, how = _sort(decision, now)
        lists[where].append(Reconciled(
            decision.delivery_id, listing.message_id if listing else None,
            listing.recipient if listing else None,
            now.state if now is not None else decision.state,
            now.last_reply_code if now is not None else None,
            now.last_reply if now is not None else None, decision.evidence, how))
    report = ReconcileReport(tuple(lists["delivered"]), tuple(lists["not_delivered"]),
                             tuple(lists["uncertain"]), recovered.set_aside)
    log.info("delivery.reconciled", node=settings.node.name, **report.counts())
    return report


def _identity(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return journal_identity(directory)


async def _leased(store: Store) -> dict[int, DeliveryListing]:
    """Every leased delivery with its message and recipient, read before recovery
    changes them. Listed oldest change first, so ``limit`` (how many were leased a
    moment before) covers every lease of a dead owner: a newer lease sorts after it."""
    owners = await store.lease_owners("%")
    count = sum(len(ids) for ids in owners.values())
    if count == 0:
        return {}
    return {d.id: d for d in await store.deliveries_in_state("leased", count)}


def _sort(decision: Decision, now: DeliveryRecord | None) -> tuple[str, str | None]:
    """Which list a decision goes to and, when certainly not delivered, how."""
    if decision.state == "delivered":
        return "delivered", None
    if decision.state == "failed":
        return "not_delivered", "failed"
    if decision.state == "released":
        return "not_delivered", "held" if now is not None and now.state == "held" \
            else "requeued"
    if decision.state == "deferred" and not decision.possible_duplicate:
        return "not_delivered", "requeued"  # a 4xx reply: refused, to be retried
    return "uncertain", None  # no reply to the dot, or resent on a retry route
