"""What the store takes and gives: messages, deliveries, outcomes, listings and states."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

#: Delivery states after which nothing more happens (a message with only these is done).
FINAL_STATES = frozenset({"delivered", "failed"})
#: Delivery states with work left, for an operator or the node itself.
PENDING_STATES = ("queued", "deferred", "leased", "uncertain", "held")
#: Every delivery state (DESIGN.md, Delivery states).
ALL_STATES = (*PENDING_STATES, "delivered", "failed", "rerouted")


@dataclass(frozen=True)
class NewMessage:
    """A message as intake commits it: envelope, body and trace data."""

    id: uuid.UUID
    mail_from: str
    recipients: Sequence[str]
    trace_headers: bytes
    body: bytes | bytearray
    client_address: str
    helo_name: str
    auth_user: str | None
    message_id_header: str | None


@dataclass(frozen=True)
class MessageRecord:
    """A stored message without its body."""

    id: uuid.UUID
    mail_from: str
    size_bytes: int
    client_address: str
    helo_name: str
    auth_user: str | None
    message_id_header: str | None
    received_at: datetime
    done_at: datetime | None
    #: Where a rerouted copy came from: the source node and its message id.
    origin_node: str | None = None
    origin_message: uuid.UUID | None = None

    @property
    def envelope(self) -> Envelope:
        """What delivery needs of it."""
        return Envelope(self.id, self.mail_from, self.received_at, self.message_id_header,
                        self.size_bytes)


@dataclass(frozen=True)
class DeliveryRecord:
    """One recipient's delivery and its last evidence."""

    id: int
    recipient: str
    next_hop: str
    state: str
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_reply_code: int | None
    last_reply: str | None
    possible_duplicate: bool
    hold_reason: str | None
    #: The node a reroute hands (or handed) this delivery to, and the copy's message id
    #: there once the handoff has its receipt.
    reroute_target: str | None = None
    rerouted_to_message: uuid.UUID | None = None


@dataclass(frozen=True)
class Envelope:
    """What delivery needs of a message besides its body."""

    id: uuid.UUID
    mail_from: str
    received_at: datetime
    message_id_header: str | None
    size_bytes: int


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery leased to one worker, with its message's envelope (read in the claim)."""

    id: int
    message_id: uuid.UUID
    recipient: str
    next_hop: str
    attempts: int
    envelope: Envelope


#: What one attempt can prove about a delivery (DESIGN.md I2).
#: ``held``: set aside by the attempt, nothing sent (its stored body does not decode).
OutcomeState = Literal["delivered", "deferred", "failed", "uncertain", "held"]




@dataclass(frozen=True)
class QueueStats:
    """What the queue holds now: counts per pending state, and how far behind it is."""

    by_state: dict[str, int]
    #: Leases past their expiry: kept (never blindly unlocked) until their owner dies.
    expired_leases: int
    #: Seconds the most overdue due delivery has waited past its due time (0: none).
    due_lag_s: float
    #: Seconds since the oldest message with work left arrived (0: none).
    oldest_message_s: float
    #: Deliveries delivered in the last 60 seconds.
    delivered_last_minute: int = 0
    #: Deliveries rerouted off this store, and onto it, in the last 60 seconds.
    rerouted_out_last_minute: int = 0
    rerouted_in_last_minute: int = 0


@dataclass(frozen=True)
class AttemptOutcome:
    """What one attempt proved about one delivery, with the evidence (I2)."""

    delivery_id: int
    state: OutcomeState
    reply_code: int | None
    reply: str
    retry_in_s: float = 0.0
    possible_duplicate: bool = False
    #: The remote host the attempt talked to (None when it reached none).
    host: str | None = None
    #: Unix times the attempt started, wrote the final dot and lost the reply to it
    #: (None when unknown or when it did not happen): the evidence behind ``uncertain``.
    started_at: float | None = None
    dot_at: float | None = None
    reply_lost_at: float | None = None


@dataclass(frozen=True)
class SetAside:
    """Outcomes the store refused, to keep with their raw evidence (DESIGN.md I3b)."""

    source: Literal["settlement", "replay"]
    owner: str
    attempt_id: str
    delivery_ids: tuple[int, ...]
    #: Why they could not be applied (safe text).
    reason: str
    #: What was refused, exactly as it was (the outcomes or the journal lines).
    raw: bytes


@dataclass(frozen=True)
class SetAsideRecord:
    """A kept record, as an operator lists it."""

    id: int
    at: datetime
    source: str
    owner: str
    attempt_id: str
    delivery_ids: list[int]
    reason: str
    raw: bytes


#: A node's operating mode (DESIGN.md, Node modes).
NodeModeName = Literal["active", "draining", "isolated"]


@dataclass(frozen=True)
class NodeMode:
    """A node's mode, why, by whom and since when."""

    mode: NodeModeName
    reason: str
    changed_by: str
    changed_at: datetime
    #: The last controller term this mode accepted (fencing); None: never a controller's.
    term: int | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One operator action, as the node's audit trail keeps it."""

    id: int
    at: datetime
    node: str
    operator: str
    action: str
    reason: str
    requested: list[int]
    changed: list[int]
    #: How it ended (``ok``, ``partial``, ``failed: …``) and what it counted.
    result: str = "ok"
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveryListing:
    """A delivery as an operator lists it: envelope, state and last evidence."""

    id: int
    message_id: uuid.UUID
    mail_from: str
    recipient: str
    next_hop: str
    state: str
    attempts: int
    last_reply_code: int | None
    last_reply: str | None
    possible_duplicate: bool
    hold_reason: str | None
    updated_at: datetime
    #: Filled by the queue tools' filter (``delivery_filter``), None in older listings.
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    received_at: datetime | None = None
    size_bytes: int | None = None
    #: The remote host of its last attempt.
    last_host: str | None = None
    #: When its last attempt started, wrote the final dot and lost the reply.
    last_attempt_started_at: datetime | None = None
    last_dot_at: datetime | None = None
    last_reply_lost_at: datetime | None = None


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries a queue tool lists or acts on (None: any)."""

    states: tuple[str, ...] = PENDING_STATES
    destination: str | None = None
    older_than_s: float = 0.0
    sender: str | None = None


@dataclass(frozen=True)
class QueueGroup:
    """Deliveries with work left sharing a state, a next hop and an age bucket."""

    state: str
    next_hop: str
    #: Index into the summary's bounds: 0 is younger than the first bound.
    bucket: int
    count: int
    bytes: int


@dataclass(frozen=True)
class DeliveryEvent:
    """One entry of a delivery's evidence timeline."""

    at: datetime
    state: str
    reply_code: int | None
    detail: str
    actor: str
    #: The remote host of the attempt this event records, when there was one.
    host: str | None = None


def recipient_next_hop(recipient: str) -> str:
    """The next hop a recipient is grouped by: its domain, lower-cased."""
    return recipient.rpartition("@")[2].lower()


@dataclass(frozen=True)
class DeletedMessage:
    """What an operator's ``delete --bounce`` DSN needs of one message."""

    id: uuid.UUID
    mail_from: str
    received_at: datetime
    #: The added trace headers and the first bytes of the body as received.
    head: bytes
    recipients: tuple[str, ...]
