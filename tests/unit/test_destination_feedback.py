"""Destination feedback (DESIGN.md): which results shrink a destination's window."""

from __future__ import annotations

import pytest

from mta.delivery.attempt import destination_pushback
from mta.delivery.outbound.transaction import Phase, RecipientResult, Source


def result(code: int, phase: Phase, text: str = "text",
           source: Source = "smtp") -> RecipientResult:
    return RecipientResult("r@dest.test", code, text, phase, phase == "data_end", source)


@pytest.mark.parametrize("unwell", [
    result(0, "connect", "connection refused"),
    result(0, "greeting", "timeout waiting for the greeting"),
    result(421, "greeting", "421 4.3.2 busy"),
    result(421, "rcpt", "421 4.4.2 closing"),
    result(451, "mail", "451 4.3.0 try later"),
    result(452, "data", "452 4.3.1 no room"),
    result(0, "data_end", "timeout waiting for reply to end of data"),
])
def test_connection_trouble_timeouts_and_4xx_to_the_session_push_back(
    unwell: RecipientResult,
) -> None:
    assert destination_pushback([result(250, "data_end"), unwell]) is not None


@pytest.mark.parametrize("fine", [
    result(250, "data_end"),
    result(550, "rcpt", "550 5.1.1 no such user"),
    result(450, "rcpt", "450 4.2.0 mailbox busy"),
    result(554, "data_end", "554 5.7.1 content refused"),
    result(451, "data_end", "451 4.3.0 this message later"),
    result(0, "rcpt", "address not sendable", "local"),
    result(0, "connect", "delivery temporarily suspended", "local"),
    result(0, "connect", "NXDOMAIN for dest.test", "dns_permanent"),
])
def test_one_recipients_reply_and_our_own_refusals_say_nothing(fine: RecipientResult) -> None:
    assert destination_pushback([fine]) is None
