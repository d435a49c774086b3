"""Recovery at start: replay dead processes' journals, then requeue what they never sent."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mta.config import UncertainMode
from mta.delivery.outbound.transaction import RecipientResult, reply_line
from mta.delivery.owner import like_literal, owner_prefix
from mta.delivery.retry import RetryPolicy, classify, reply_lost
from mta.delivery.settlement import bounce_for, raw_evidence
from mta.errors import StoreRejected
from mta.journal.files import lock_file_exists
from mta.journal.records import ReplyReceived
from mta.journal.replay import PendingAttempt, Unreadable, adopt, owner_alive
from mta.mail.text import outside_text
from mta.queue.records import AttemptOutcome, NewMessage, SetAside
from mta.queue.store import Store

#: The evidence a lease of a dead process with no dot pending is released with.
RELEASED = ("lease of a process that died before its final dot: no dot was pending in its "
            "journal, so the message was certainly not sent")


@dataclass(frozen=True)
class Decision:
    """What recovery recorded for one delivery: an outcome it replayed (``delivered``,
    ``failed``, ``deferred`` or ``uncertain``), or ``released`` (never sent, requeued or
    held by the crash-loop breaker), with the evidence it recorded."""

    delivery_id: int
    state: str
    evidence: str
    possible_duplicate: bool = False


@dataclass(frozen=True)
class RecoveryReport:
    """What a start-up replay did."""

    applied: int
    uncertain: int
    released: int
    #: Attempts whose outcomes the store refused, and journals that could not be read:
    #: kept, their deliveries uncertain.
    set_aside: int = 0
    #: Leases whose owner's journal is missing: uncertain.
    journal_missing: int = 0
    #: Every delivery this run changed, and how.
    decisions: tuple[Decision, ...] = ()


async def recover(store: Store, journal_dir: Path, node_name: str, policy: RetryPolicy, *,
                  identity: str, crash_limit: int = 3, crash_window_s: float = 3600.0,
                  reporting_mta: str = "localhost") -> RecoveryReport:
    """Replay dead processes' journals, then requeue what they leased but never sent.

    An attempt with replies is applied as the replies say, a failure with its DSN; a
    delivery whose dot was pending without a reply becomes ``uncertain`` (the message may
    have arrived). A delivery a dead process leased with no dot pending in its journal
    was certainly not sent, but only that journal can say so: a lease whose owner's
    journal is gone, is another one (``identity`` is this directory's, the store knows
    each owner's) or cannot be read is ``uncertain`` (I3). Journal records are untrusted
    (I3b): their texts are made safe, and what the store still refuses is set aside.
    """
    adoption = await asyncio.to_thread(adopt, journal_dir)
    applied = uncertain = set_aside = 0
    decisions: list[Decision] = []
    try:
        for journal in adoption.unreadable.values():
            decisions += await _set_aside_unreadable(store, journal)
            set_aside += 1
        attempts: list[PendingAttempt] = [*adoption.pending.replied,
                                          *adoption.pending.unanswered]
        for attempt in attempts:
            try:
                mode = _uncertain_mode(attempt.dot.uncertain_mode)
                outcomes = [_replayed(reply, policy, mode) for reply in attempt.replies]
                outcomes += [_unanswered(delivery_id, policy, mode)
                             for delivery_id in attempt.missing]
                outcomes = [dataclasses.replace(o, host=attempt.dot.host or None,
                                                dot_at=attempt.dot.at) for o in outcomes]
                bounce = await _replayed_bounce(store, attempt, outcomes, reporting_mta)
                done = await store.record_outcomes(attempt.owner, outcomes, bounce=bounce)
            except (StoreRejected, ValueError) as exc:  # refused, or a reply no server sends
                held = await store.lease_owners(like_literal(attempt.owner))
                record = SetAside(
                    source="replay", owner=attempt.owner,
                    attempt_id=attempt.dot.attempt_id,
                    delivery_ids=attempt.dot.delivery_ids, reason=outside_text(str(exc)),
                    raw=raw_evidence([dataclasses.asdict(attempt.dot),
                                      *map(dataclasses.asdict, attempt.replies)]))
                kept = await store.set_aside(record)
                decisions += _set_aside_decisions(
                    kept, record, set(held.get(attempt.owner, [])))
                set_aside += 1
                continue
            applied += len(done)
            uncertain += len(set(attempt.missing) & done)
            decisions += [Decision(o.delivery_id, o.state, o.reply, o.possible_duplicate)
                          for o in outcomes if o.delivery_id in done]
        adoption.commit()
    finally:
        adoption.close()
    released = missing = 0
    leases = await store.lease_owners(like_literal(owner_prefix(node_name)) + "%")
    dead = {owner: ids for owner, ids in leases.items() if not owner_alive(journal_dir, owner)}
    registered = await store.journal_owners(list(dead)) if dead else {}
    for owner, ids in dead.items():
        reason = _journal_missing(journal_dir, owner, registered.get(owner), identity)
        if reason is not None:
            evidence = f"journal missing: {reason}; the message may have been sent"
            changed = await store.record_outcomes(owner, [AttemptOutcome(
                delivery_id, "uncertain", None, evidence) for delivery_id in ids])
            missing += len(changed)
            decisions += [Decision(d, "uncertain", evidence) for d in ids if d in changed]
            continue
        freed = await store.release_unsent(owner, ids, RELEASED, crash_limit=crash_limit,
                                           crash_window_s=crash_window_s)
        released += len(freed)
        decisions += [Decision(d, "released", RELEASED) for d in ids if d in freed]
    return RecoveryReport(applied, uncertain, released, set_aside, missing, tuple(decisions))


def _journal_missing(journal_dir: Path, owner: str, registered: str | None,
                     identity: str) -> str | None:
    """Why ``owner``'s journal cannot speak for its leases, or None when it can."""
    if registered is not None and registered != identity:
        return (f"{journal_dir} is not the journal {owner} wrote to (identity {registered}, "
                f"found {identity}): was the data directory replaced?")
    if not lock_file_exists(journal_dir, owner):
        return f"{journal_dir} holds no journal of {owner}: was it wiped?"
    return None


async def _set_aside_unreadable(store: Store, journal: Unreadable) -> list[Decision]:
    """Keep an unreadable journal's bytes and make its owner's leases uncertain."""
    leases = await store.lease_owners(like_literal(journal.owner))
    held = leases.get(journal.owner, [])
    record = SetAside(
        source="replay", owner=journal.owner, attempt_id="-", delivery_ids=tuple(held),
        reason=outside_text(f"journal unreadable: {journal.error}"),
        raw=await asyncio.to_thread(journal.raw))
    return _set_aside_decisions(await store.set_aside(record), record, set(held))


def _set_aside_decisions(kept: int, record: SetAside, held: set[int]) -> list[Decision]:
    """The deliveries set-aside record ``kept`` made uncertain: those its owner held."""
    evidence = f"evidence set aside as #{kept} (mta queue set-aside): {record.reason}"
    return [Decision(d, "uncertain", evidence) for d in record.delivery_ids if d in held]


async def _replayed_bounce(store: Store, attempt: PendingAttempt,
                           outcomes: Sequence[AttemptOutcome],
                           reporting_mta: str) -> NewMessage | None:
    """The DSN owed for the failures a replayed attempt records, if any."""
    failed = {o.delivery_id for o in outcomes if o.state == "failed"}
    if not failed:
        return None
    message = await store.message(uuid.UUID(attempt.dot.message_id))
    if message is None:
        return None
    recipients = {d.id: d.recipient for d in await store.deliveries(message.id)}
    results = [RecipientResult(recipients[r.delivery_id], r.code, outside_text(r.text),
                               "data_end", r.data_sent)
               for r in attempt.replies if r.delivery_id in failed and r.delivery_id in recipients]
    return await bounce_for(store, message.envelope, results,
                            remote_mta=attempt.dot.host, reporting_mta=reporting_mta)


def _uncertain_mode(recorded: str) -> UncertainMode:
    """The route's choice recorded with the dot; anything else reads as ``uncertain``."""
    return "retry" if recorded == "retry" else "uncertain"


def _unanswered(delivery_id: int, policy: RetryPolicy, mode: UncertainMode) -> AttemptOutcome:
    """A dot pending without a reply: ``uncertain``, or on a ``retry`` route a resend
    marked ``possible_duplicate`` (README: uncertain_mode)."""
    reason = "process died with the final dot pending; no reply was recorded (journal replay)"
    if mode == "retry":
        return AttemptOutcome(delivery_id, "deferred", None, f"{reason}; resent (retry route)",
                              policy.minimal_backoff, possible_duplicate=True)
    return AttemptOutcome(delivery_id, "uncertain", None, reason)


def _replayed(reply: ReplyReceived, policy: RetryPolicy, mode: UncertainMode) -> AttemptOutcome:
    decision = classify(reply.code, reply.data_sent, age=0.0, policy=policy, uncertain_mode=mode)
    lost = reply_lost(reply.code, reply.data_sent)
    return AttemptOutcome(reply.delivery_id, decision.outcome, reply.code or None,
                          f"{reply_line(reply.code, outside_text(reply.text))} "
                          f"({decision.reason}, journal replay)",
                          policy.minimal_backoff, decision.possible_duplicate,
                          reply_lost_at=reply.at if lost else None)
