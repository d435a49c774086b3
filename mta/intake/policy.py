"""Intake policy: who may submit, how many at once, and the commit before ``250``.

The protocol (``protocol.py``) calls the policy with plain values: a client address, a
:class:`Submission`, and a :class:`SessionHandle` it can close at shutdown. The policy
never reaches into a session or its transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from mta.admin.metrics import Metrics
from mta.concurrency import acquire_within
from mta.config import Settings
from mta.errors import StoreFull, StoreUnavailable
from mta.faults import fault_point
from mta.intake import replies
from mta.intake.admission import Admission
from mta.intake.auth import AuthThrottle, Credentials
from mta.intake.proxy import ProxySources
from mta.intake.trace import (
    TraceContext,
    inspect_headers,
    message_id_header,
    printable,
    received_header,
)
from mta.mail.text import outside_text
from mta.queue import NewMessage, Store
from mta.queue.dedup import DedupStore, DedupUnavailable, Seen
from mta.queue.ids import new_message_id, queue_id
from mta.queue.intake_batch import EnqueueBatcher

log = structlog.get_logger(__name__)


class SessionHandle(Protocol):
    """What the policy holds of an open session: it can close its connection."""

    def close_connection(self) -> None:
        """Close the session's connection now."""


@dataclass(frozen=True)
class Submission:
    """One message as the protocol read it: envelope, body, and who sent it how."""

    mail_from: str
    recipients: tuple[str, ...]
    body: bytearray
    client_ip: str
    #: The client's HELO or EHLO name as it sent it (it may hold anything).
    helo: str
    tls: bool
    auth_user: str | None


class Intake:
    """Shared by every session of one listener set: policy, limits and the commit."""

    def __init__(self, settings: Settings, store: Store, metrics: Metrics,
                 admission: Admission, dedup: DedupStore | None = None) -> None:
        self.settings = settings
        self.store = store
        #: Group commit: concurrent sessions' messages share a transaction (I1 holds).
        self.commits = EnqueueBatcher(store, settings.node.intake_db_slots)
        #: Fleet-wide de-duplication of client retries, when ``[dedup]`` is on.
        self.dedup = dedup
        self.metrics = metrics
        self.admission = admission
        self.credentials = Credentials(settings.users)
        smtp = settings.smtp
        self.auth_throttle = AuthThrottle(smtp.auth_failure_limit, smtp.auth_failure_window)
        self.proxy = ProxySources(smtp.proxy_protocol_from, smtp.proxy_protocol_timeout)
        self._networks = [ipaddress.ip_network(net, strict=False)
                          for net in smtp.allowed_networks]
        self._data_slots = asyncio.Semaphore(smtp.data_concurrency)
        self._from_allowed_network = functools.lru_cache(maxsize=4096)(self._network_check)
        #: Open sessions and the client address of each; sessions per client address.
        self._sessions: dict[SessionHandle, str] = {}
        self._per_client: Counter[str] = Counter()
        self._data_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = True
        #: The node's mode (DESIGN.md, Node modes): only an active node takes new mail.
        self.mode = "active"
        #: Called after every commit (the node wakes its delivery workers with it).
        self.on_accepted: list[Callable[[], None]] = []

    # --- sessions -------------------------------------------------------------

    def refuse_mail(self) -> str | None:
        """The reply that refuses new mail on this node (draining or isolated), or None."""
        if self.mode == "active":
            return None
        self.metrics.intake_rejected.labels(f"node_{self.mode}").inc()
        return replies.NODE_NOT_ACTIVE.format(mode=self.mode)

    def refuse_session(self, client_ip: str) -> str | None:
        """The reply that refuses a new session from ``client_ip``, or None to greet it."""
        if not self.accepting:
            return replies.NOT_ACCEPTING
        refusal = self.refuse_mail()
        if refusal is not None:
            return refusal
        if len(self._sessions) >= self.settings.smtp.max_sessions:
            self.metrics.intake_rejected.labels("too_many_sessions").inc()
            return replies.TOO_MANY_SESSIONS
        if self._per_client[client_ip] >= self.settings.smtp.max_sessions_per_client:
            self.reject("too_many_sessions_per_client", client_ip)
            return replies.TOO_MANY_FROM_CLIENT
        return None

    def track(self, session: SessionHandle, client_ip: str) -> None:
        """Count an open session of ``client_ip``."""
        self._sessions[session] = client_ip
        self._per_client[client_ip] += 1
        self.metrics.intake_sessions.set(len(self._sessions))

    def untrack(self, session: SessionHandle) -> None:
        """Forget a closed session."""
        client_ip = self._sessions.pop(session, None)
        if client_ip is not None:
            self._per_client[client_ip] -= 1
            if not self._per_client[client_ip]:
                del self._per_client[client_ip]
        self.metrics.intake_sessions.set(len(self._sessions))

    @property
    def session_count(self) -> int:
        """Sessions open now."""
        return len(self._sessions)

    def stop_accepting(self) -> None:
        """Refuse new sessions and commands with 421; DATA phases in flight finish."""
        self.accepting = False

    async def wait_data_idle(self, timeout: float) -> bool:
        """Wait until no DATA phase is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close_sessions(self) -> None:
        """Close every session's connection."""
        for session in list(self._sessions):
            session.close_connection()

    # --- policy -----------------------------------------------------------------

    def may_submit(self, *, authenticated: bool, client_ip: str) -> bool:
        """I10: authenticated clients and clients from ``allowed_networks`` only."""
        return authenticated or self._from_allowed_network(client_ip)

    def _network_check(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def reject(self, reason: str, client_ip: str | None) -> None:
        """Count and log one refusal."""
        self.metrics.intake_rejected.labels(reason).inc()
        log.info("intake.rejected", reason=reason, client=client_ip)

    @contextlib.asynccontextmanager
    async def data_phase(self) -> AsyncIterator[str | None]:
        """Hold one of ``data_concurrency`` slots; yields a refusal if none came in time."""
        if not await acquire_within(self._data_slots, self.settings.database.acquire_timeout):
            self.metrics.intake_rejected.labels("data_slots_busy").inc()
            yield replies.STORE_UNAVAILABLE
            return
        self._data_in_flight += 1
        self._idle.clear()
        self.metrics.intake_data_in_flight.set(self._data_in_flight)
        try:
            yield None
        finally:
            self._data_slots.release()
            self._data_in_flight -= 1
            self.metrics.intake_data_in_flight.set(self._data_in_flight)
            if self._data_in_flight == 0:
                self._idle.set()

    # --- commit -----------------------------------------------------------------

    async def commit(self, submission: Submission) -> str:
        """Check the message, commit it durably, and return the reply (250 only if stored)."""
        smtp = self.settings.smtp
        body = submission.body
        client_ip = submission.client_ip
        facts = inspect_headers(body)
        if facts.received_count >= smtp.max_received_headers:
            self.reject("mail_loop", client_ip)
            return replies.MAIL_LOOP
        recipients = submission.recipients
        if facts.message_id is not None and self.dedup is not None:
            seen = await self._dedup_seen(facts.message_id, submission)
            if seen is not None and len(seen.fresh) < len(recipients):
                self.metrics.dedup_duplicates.inc(len(recipients) - len(seen.fresh))
                log.info("intake.duplicate", original_queue_id=seen.original_queue_id,
                         message_id=facts.message_id, seen=len(recipients) - len(seen.fresh),
                         fresh=len(seen.fresh), client=client_ip)
                if not seen.fresh:  # every recipient was taken: the original's queue id
                    return replies.ACCEPTED.format(queue_id=seen.original_queue_id)
                recipients = seen.fresh
        message_uuid = new_message_id()
        qid = queue_id(message_uuid)
        auth_user = submission.auth_user
        helo = printable(submission.helo)  # a client's HELO may hold NUL
        trace = received_header(TraceContext(
            helo=helo, client_ip=client_ip,
            hostname=smtp.hostname, tls=submission.tls,
            authenticated=auth_user is not None, queue_id=qid, recipients=recipients,
        ))
        message_id = facts.message_id
        if message_id is None:
            added, message_id = message_id_header(qid, smtp.hostname)
            trace += added
        trace_bytes = trace.encode("ascii", "replace")
        size = len(trace_bytes) + len(body)
        started = time.perf_counter()
        try:
            self.admission.check(size)
            await self.commits.enqueue(NewMessage(
                id=message_uuid, mail_from=submission.mail_from, recipients=recipients,
                trace_headers=trace_bytes, body=body, client_address=client_ip,
                helo_name=helo, auth_user=auth_user,
                message_id_header=message_id,
            ))
        except StoreFull as exc:
            self.reject("store_full", client_ip)
            log.warning("intake.store_full", queue_id=qid, error=str(exc))
            return replies.STORE_FULL
        except StoreUnavailable as exc:
            self.reject("store_unavailable", client_ip)
            log.warning("intake.store_unavailable", queue_id=qid, error=str(exc))
            return replies.STORE_UNAVAILABLE
        self.metrics.intake_commit_seconds.observe(time.perf_counter() - started)
        if facts.message_id is not None and self.dedup is not None:
            await self._dedup_record(facts.message_id, submission.mail_from, recipients, qid)
        fault_point("intake.before_reply")
        self.metrics.intake_accepted.inc()
        self.metrics.intake_accepted_recipients.inc(len(recipients))
        self.metrics.intake_accepted_bytes.inc(size)
        self.admission.note_accepted(size)
        for callback in self.on_accepted:
            callback()
        log.info("intake.accepted", queue_id=qid, mail_from=submission.mail_from,
                 recipients=len(recipients), size=size, client=client_ip,
                 message_id=message_id, auth_user=auth_user)
        return replies.ACCEPTED.format(queue_id=qid)

    async def _dedup_seen(self, message_id: str, submission: Submission) -> Seen | None:
        """Which recipients an earlier submission took; None when the key store did not
        answer in time (then the mail is accepted unchecked, counted)."""
        assert self.dedup is not None
        try:
            return await self.dedup.seen(message_id, submission.mail_from,
                                         submission.recipients)
        except DedupUnavailable as exc:
            self.metrics.dedup_unavailable.labels("check").inc()
            log.warning("intake.dedup_unavailable", step="check", error=str(exc))
            return None

    async def _dedup_record(self, message_id: str, mail_from: str,
                            recipients: Sequence[str], qid: str) -> None:
        assert self.dedup is not None
        try:
            await self.dedup.record(message_id, mail_from, recipients, qid)
        except DedupUnavailable as exc:
            self.metrics.dedup_unavailable.labels("record").inc()
            log.warning("intake.dedup_unavailable", step="record", error=str(exc))

    def client_fault(self, reason: str, error: BaseException) -> str:
        """A command failed by the client's doing (a failed TLS handshake, a connection it
        broke): an info-level event with its reason, never a 250."""
        self.metrics.intake_rejected.labels(reason).inc()
        log.info("intake.client_fault", reason=reason, error=outside_text(repr(error)))
        return replies.INTERNAL_ERROR

    def internal_error(self, error: BaseException) -> str:
        """A command failed by our doing: logged with its traceback, never a 250."""
        log.error("intake.internal_error", error=repr(error), exc_info=error)
        self.metrics.intake_rejected.labels("internal_error").inc()
        return replies.INTERNAL_ERROR
