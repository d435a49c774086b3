"""Delivery status notifications (RFC 3464): structure, fields, suppression, wire format."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message, MIMEPart
from typing import Any

import pytest

from mta.delivery.dsn import MAX_DIAGNOSTIC, FailedRecipient, build_dsn, dsn_suppressed
from mta.mail.address import parse_path

ARRIVED = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
TRIED = ARRIVED + timedelta(hours=2)
NOW = ARRIVED + timedelta(hours=3)
HEADERS = (b"From: Alice <alice@origin.test>\r\nTo: bob@dest.test\r\n"
           b"Subject: quarterly newsletter\r\nMessage-ID: <n1@origin.test>\r\n\r\n")


def failure(recipient: str = "bob@dest.test", **overrides: Any) -> FailedRecipient:
    """A failed recipient with a remote 550, overridable field by field."""
    fields: dict[str, Any] = {
        "recipient": recipient, "status": "5.1.1", "action": "failed",
        "remote_mta": "mx.dest.test", "diagnostic": "smtp; 550 5.1.1 no such user",
        "last_attempt": TRIED,
    }
    fields.update(overrides)
    return FailedRecipient(**fields)


def dsn(*failures: FailedRecipient, sender: str = "alice@origin.test",
        headers: bytes = HEADERS) -> bytes | None:
    """``build_dsn`` with the test's fixed host, dates and queue id."""
    return build_dsn(reporting_mta="relay1.fleet.test", original_sender=sender,
                     original_headers=headers, failures=failures or (failure(),),
                     arrival_date=ARRIVED, queue_id="Q0001", now=NOW)


def parsed(raw: bytes | None) -> EmailMessage:
    """The DSN parsed back with the modern policy."""
    assert raw is not None
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def part(message: EmailMessage, index: int) -> MIMEPart:
    """One of the report's three parts."""
    return list(message.iter_parts())[index]


def status_blocks(message: EmailMessage) -> list[Message]:
    """The field blocks of the message/delivery-status part."""
    status = part(message, 1)
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, Message)]


def test_dsn_is_a_delivery_status_report_addressed_to_the_sender() -> None:
    message = parsed(dsn())

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in message.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay1.fleet.test"
    assert message["To"] == "alice@origin.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Date"].datetime == NOW
    assert message["Message-ID"].endswith("@relay1.fleet.test>")
    human = " ".join(part(message, 0).get_content().split())
    assert "This is the mail system at host relay1.fleet.test." in human
    assert "<bob@dest.test> (failed): host mx.dest.test said: smtp; 550 5.1.1 no such user" in human


def test_dsn_carries_per_message_and_per_recipient_fields() -> None:
    per_message, per_recipient = status_blocks(parsed(dsn()))

    assert per_message["Reporting-MTA"] == "dns; relay1.fleet.test"
    assert per_message["X-Queue-ID"] == "Q0001"
    assert per_message["Arrival-Date"] == "Sun, 01 Mar 2026 08:00:00 +0000"
    assert dict(per_recipient.items()) == {
        "Final-Recipient": "rfc822; bob@dest.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.dest.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        "Last-Attempt-Date": "Sun, 01 Mar 2026 10:00:00 +0000",
    }


def test_each_recipient_gets_its_own_block() -> None:
    expired = failure("carol@dest.test", status="4.4.7", remote_mta=None,
                      diagnostic="X-Fleet; delivery lifetime expired")
    blocks = status_blocks(parsed(dsn(failure(), expired)))

    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@dest.test", "rfc822; carol@dest.test"]
    assert blocks[2]["Status"] == "4.4.7"
    assert blocks[2]["Remote-MTA"] is None
    assert blocks[2]["Diagnostic-Code"] == "X-Fleet; delivery lifetime expired"


def test_diagnostic_without_a_type_is_marked_smtp() -> None:
    blocks = status_blocks(parsed(dsn(failure(diagnostic="550 5.1.1 no such user"))))
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"


def test_only_delayed_recipients_make_a_delay_notice() -> None:
    message = parsed(dsn(failure(action="delayed", status="4.4.1")))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert status_blocks(message)[1]["Action"] == "delayed"


def test_original_headers_are_returned_without_the_body() -> None:
    returned = part(parsed(dsn(headers=HEADERS + b"the body\r\n")), 2).get_payload(decode=True)
    assert returned == HEADERS.rstrip(b"\r\n") + b"\r\n"
    assert b"the body" not in returned


def test_eight_bit_original_headers_are_quoted_printable() -> None:
    headers = b"From: alice@origin.test\r\nSubject: caf\xc3\xa9\r\n\r\n"
    raw = dsn(headers=headers)
    assert raw is not None and raw.isascii()
    returned = part(parsed(raw), 2)
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"Subject: caf\xc3\xa9" in returned.get_payload(decode=True)


@pytest.mark.parametrize("sender", ["", "<>"])
def test_null_sender_gets_no_dsn(sender: str) -> None:
    assert dsn(sender=sender) is None
    assert dsn_suppressed(sender, HEADERS) == "null sender"


@pytest.mark.parametrize("value", ["auto-generated", "auto-replied", "Auto-Notified; owner=x"])
def test_auto_submitted_original_gets_no_dsn(value: str) -> None:
    headers = f"Auto-Submitted: {value}\r\n".encode() + HEADERS
    assert dsn(headers=headers) is None


def test_auto_submitted_no_still_gets_a_dsn() -> None:
    assert dsn(headers=b"Auto-Submitted: no\r\n" + HEADERS) is not None


def test_precedence_bulk_still_gets_a_dsn() -> None:
    assert dsn(headers=b"Precedence: bulk\r\n" + HEADERS) is not None


def test_dsn_of_a_dsn_is_suppressed() -> None:
    first = dsn()
    assert first is not None
    headers = first.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    without_auto = re.sub(rb"Auto-Submitted:[^\r]*\r\n", b"", headers)
    assert b"Auto-Submitted" not in without_auto

    assert dsn(headers=without_auto) is None
    assert dsn_suppressed("x@origin.test", without_auto) == "original is a delivery-status report"


def test_other_reports_are_answered() -> None:
    headers = b'Content-Type: multipart/report; report-type="other"\r\n' + HEADERS
    assert dsn(headers=headers) is not None


def test_output_is_crlf_seven_bit_with_short_lines() -> None:
    diagnostic = "smtp; 550 5.7.1 r\u00e9fus\u00e9\r\nX-Injected: yes\n" + "x" * 5000
    hostile = failure(diagnostic=diagnostic)
    raw = dsn(hostile, failure("carol@dest.test"),
              headers=b"Subject: " + b"y" * 2000 + b"\r\nX-Raw: \xff\r\n\r\n")
    assert raw is not None

    assert raw.isascii()
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    block = status_blocks(parsed(raw))[1]
    assert block["X-Injected"] is None
    diagnostic = str(block["Diagnostic-Code"])
    assert diagnostic.startswith("smtp; 550 5.7.1 r\\xe9fus\\xe9 X-Injected: yes xxx")
    assert len(diagnostic) <= MAX_DIAGNOSTIC


@pytest.mark.parametrize("bad", [
    {"status": "550"},
    {"action": "bounced"},
    {"recipient": "b\u00f6b@dest.test"},
    {"recipient": "bob@dest.test\r\nBcc: x@evil.test"},
    {"last_attempt": datetime(2026, 3, 1, 10, 0)},
])
def test_malformed_input_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dsn(failure(**bad))


def test_no_failures_is_refused() -> None:
    with pytest.raises(ValueError):
        build_dsn(reporting_mta="relay1.fleet.test", original_sender="alice@origin.test",
                  original_headers=HEADERS, failures=[], arrival_date=ARRIVED, queue_id="Q1")


#: Every form of address intake accepts (RFC 5321 4.1.2 as mta.mail.address parses it).
ACCEPTED_PATHS = [
    "<bob@dest.test>",
    '<"john doe"@dest.test>',
    '<"a\\"b"@dest.test>',
    "<!#$%&'*+/=?^_`{|}~-@dest.test>",
    "<first.last@sub.dest.test>",
    "<user@[192.0.2.1]>",
    "<user@[IPv6:2001:db8::1]>",
    "<@relay.test,@other.test:bob@dest.test>",
    f"<{'l' * 64}@dest.test>",
]


@pytest.mark.parametrize("path", ACCEPTED_PATHS)
def test_every_address_form_intake_accepts_can_be_bounced(path: str) -> None:
    address = parse_path(path, allow_null=False).address
    raw = build_dsn(reporting_mta="mx_1.fleet.test", original_sender=address,
                    original_headers=HEADERS, failures=[failure(address)],
                    arrival_date=ARRIVED, queue_id="Q0001", now=NOW)
    message = parsed(raw)
    assert message["To"] == address
    assert str(status_blocks(message)[1]["Final-Recipient"]) == f"rfc822; {address}"


def test_a_dns_failure_is_reported_as_dns_evidence_not_as_an_smtp_reply() -> None:
    raw = dsn(failure(status="5.1.2", remote_mta=None,
                      diagnostic="X-DNS; NXDOMAIN: dest.test does not exist"))
    block = status_blocks(parsed(raw))[1]
    assert str(block["Diagnostic-Code"]) == "X-DNS; NXDOMAIN: dest.test does not exist"
    assert block["Remote-MTA"] is None and str(block["Status"]) == "5.1.2"
