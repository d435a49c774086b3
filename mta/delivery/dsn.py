"""Delivery status notifications (RFC 3464): the bounce sent when a delivery fails.

``build_dsn`` returns the DSN as CRLF, 7-bit bytes, or None when none is due. The
caller enqueues it with the null sender (``MAIL FROM:<>``), so a DSN never causes
another DSN.

When no DSN is due (``dsn_suppressed``), following RFC 3464 §2 and RFC 3834 §2/§5:

- the envelope sender is the null sender ``""`` (never bounce a bounce);
- the original carries ``Auto-Submitted:`` with any value other than ``no``;
- the original is itself a report: ``Content-Type: multipart/report`` with
  ``report-type`` delivery-status or disposition-notification (or their ``global-``
  forms).

``Precedence: bulk/list/junk`` does NOT suppress a DSN: newsletters are this system's
main traffic and their senders rely on bounces to clean their lists.

Addresses are mailboxes as intake accepts them (``mta.mail.address``: quoted local parts
and domain literals too; ASCII only, intake refuses others with ``553 5.6.7``). Diagnostics from
remote servers may be anything: control characters become spaces, non-ASCII becomes
backslash escapes, and they are cut at ``MAX_DIAGNOSTIC`` characters, so that every
line stays within 998 octets.
"""

from __future__ import annotations

import quopri
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from email.utils import format_datetime, make_msgid
from typing import Literal

from mta.mail.address import is_mailbox
from mta.mail.headers import header_block

__all__ = ["MAX_DIAGNOSTIC", "FailedRecipient", "build_dsn", "dsn_suppressed"]

Action = Literal["failed", "delayed"]

#: Longest diagnostic text kept (characters, after escaping); the rest is cut.
MAX_DIAGNOSTIC = 800
SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_TYPED = re.compile(r"[A-Za-z][A-Za-z0-9-]*[ \t]*;")
_TOKEN = re.compile(r"[!-~]+")
#: A host name as a node calls itself (``_`` is common in container host names).
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]+")
_NOT_7BIT = re.compile(rb"[^\t\n\x20-\x7e]")
_REPORT_TYPES = frozenset({
    "delivery-status", "global-delivery-status",
    "disposition-notification", "global-disposition-notification",
})
#: The generator's policy: CRLF, 7-bit transfer encodings only.
_OUTPUT = policy.SMTP.clone(cte_type="7bit", max_line_length=78)


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient's outcome, as the per-recipient block of the DSN reports it."""

    recipient: str
    status: str
    action: Action
    remote_mta: str | None
    diagnostic: str | None
    last_attempt: datetime


def dsn_suppressed(original_sender: str, original_headers: bytes) -> str | None:
    """Why no DSN may be sent for this message (see the module docstring), or None."""
    if original_sender in ("", "<>"):
        return "null sender"
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(header_block(original_headers))
    auto = headers.get("Auto-Submitted")
    if auto is not None and str(auto).split(";")[0].strip().lower() != "no":
        return "auto-submitted"
    if headers.get_content_type() == "multipart/report":
        report_type = str(headers.get_param("report-type", "", header="content-type"))
        if report_type.lower() in _REPORT_TYPES:
            return f"original is a {report_type.lower()} report"
    return None


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original_headers: bytes,
    failures: Sequence[FailedRecipient],
    arrival_date: datetime,
    queue_id: str,
    now: datetime | None = None,
) -> bytes | None:
    """The DSN for ``failures`` of one message, to be sent from ``<>``; None when suppressed.

    Raises ValueError for input that would make a malformed DSN: no failures, a naive
    datetime, a non-ASCII or whitespace-bearing address or host, a malformed status.
    """
    if dsn_suppressed(original_sender, original_headers) is not None:
        return None
    if not failures:
        raise ValueError("a DSN needs at least one recipient")
    _check_token("reporting_mta", reporting_mta, _HOST)
    _check_mailbox("original_sender", original_sender)
    _check_token("queue_id", queue_id, _TOKEN)
    now = now or datetime.now(UTC)
    _check_aware(now, arrival_date, *(f.last_attempt for f in failures))

    all_delayed = all(f.action == "delayed" for f in failures)
    report = MIMEMultipart("report", report_type="delivery-status", policy=_OUTPUT)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = original_sender
    report["Subject"] = SUBJECT_DELAYED if all_delayed else SUBJECT_FAILED
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    human = MIMEText(_human_text(reporting_mta, failures, all_delayed), "plain", "us-ascii",
                     policy=_OUTPUT)
    del human["MIME-Version"]
    report.attach(human)
    report.attach(_status_part(reporting_mta, queue_id, arrival_date, failures))
    report.attach(_headers_part(original_headers))
    return report.as_bytes(policy=_OUTPUT)


def _check_token(name: str, value: str, pattern: re.Pattern[str]) -> None:
    if not pattern.fullmatch(value):
        raise ValueError(f"{name} must be printable ASCII without spaces: {value!r}")


def _check_mailbox(name: str, value: str) -> None:
    if not is_mailbox(value):
        raise ValueError(f"{name} is not a mailbox: {value!r}")


def _check_aware(*moments: datetime) -> None:
    if any(moment.utcoffset() is None for moment in moments):
        raise ValueError("DSN dates must carry a time zone")


def _ascii_text(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """One line of printable ASCII: controls become spaces, the rest is escaped and cut."""
    flat = "".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch for ch in text)
    escaped = " ".join(flat.encode("ascii", "backslashreplace").decode("ascii").split())
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def _typed(value: str, default_type: str) -> str:
    """``type; value`` as RFC 3464 fields want it, keeping a type the caller gave."""
    text = _ascii_text(value)
    return text if _TYPED.match(text) else f"{default_type}; {text}"


def _human_text(reporting_mta: str, failures: Sequence[FailedRecipient],
                all_delayed: bool) -> str:
    """The first, human-readable part."""
    if all_delayed:
        lead = ("Your message could not be delivered yet to the recipients below. "
                "The mail system will keep trying; you do not need to send it again.")
    else:
        lead = ("Your message could not be delivered to one or more recipients. "
                "Its headers are attached below.")
    lines = [f"This is the mail system at host {reporting_mta}.", "",
             *textwrap.wrap(lead, 72), ""]
    for failure in failures:
        where = f"host {_ascii_text(failure.remote_mta)} said" if failure.remote_mta else "error"
        reason = _ascii_text(failure.diagnostic) if failure.diagnostic else failure.status
        entry = f"<{failure.recipient}> ({failure.action}): {where}: {reason}"
        lines.extend(textwrap.wrap(entry, 72, subsequent_indent="    "))
    return "\n".join(lines) + "\n"


def _fields(pairs: Sequence[tuple[str, str]]) -> Message:
    """One block of ``Name: value`` fields of a message/delivery-status body."""
    block = Message(policy=_OUTPUT)
    for name, value in pairs:
        block[name] = value
    return block


def _status_part(reporting_mta: str, queue_id: str, arrival_date: datetime,
                 failures: Sequence[FailedRecipient]) -> Message:
    """The message/delivery-status part: a per-message block, then one per recipient."""
    blocks: list[Message | str] = [_fields([("Reporting-MTA", f"dns; {reporting_mta}"),
                       ("X-Queue-ID", queue_id),
                       ("Arrival-Date", format_datetime(arrival_date))])]
    for failure in failures:
        _check_mailbox("recipient", failure.recipient)
        if not _STATUS.fullmatch(failure.status):
            raise ValueError(f"malformed status code: {failure.status!r}")
        if failure.action not in ("failed", "delayed"):
            raise ValueError(f"unknown action: {failure.action!r}")
        pairs = [("Final-Recipient", f"rfc822; {failure.recipient}"),
                 ("Action", failure.action),
                 ("Status", failure.status)]
        if failure.remote_mta:
            pairs.append(("Remote-MTA", _typed(failure.remote_mta, "dns")))
        if failure.diagnostic:
            pairs.append(("Diagnostic-Code", _typed(failure.diagnostic, "smtp")))
        pairs.append(("Last-Attempt-Date", format_datetime(failure.last_attempt)))
        blocks.append(_fields(pairs))
    part = Message(policy=_OUTPUT)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload(blocks)
    return part


def _headers_part(original_headers: bytes) -> MIMENonMultipart:
    """The text/rfc822-headers part; quoted-printable when the headers are not 7-bit clean."""
    raw = header_block(original_headers).rstrip(b"\r\n").replace(b"\r\n", b"\n")
    part = MIMENonMultipart("text", "rfc822-headers", policy=_OUTPUT)
    del part["MIME-Version"]
    part["Content-Description"] = "Undelivered message headers"
    if not _NOT_7BIT.search(raw) and all(len(line) <= 998 for line in raw.split(b"\n")):
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(raw.decode("ascii") + "\n")
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(quopri.encodestring(raw + b"\n").decode("ascii"))
    return part
