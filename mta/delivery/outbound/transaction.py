"""What the outbound client is given and what it answers: a transaction, per-recipient results."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from typing import Literal

Phase = Literal["connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data",
                "data_end"]

#: Where a result's evidence comes from: the remote SMTP server (or its silence: no
#: reply, a timeout, a broken connection), a refusal of our own before anything was sent,
#: or a DNS answer (permanent: NXDOMAIN, null MX; temporary: SERVFAIL, a timeout), which
#: carries no SMTP code at all (I2).
Source = Literal["smtp", "local", "dns_permanent", "dns_temporary"]

#: Phases of a session's setup, after the TCP connect: replies there are not about mail.
SETUP_PHASES: frozenset[Phase] = frozenset({"greeting", "ehlo", "starttls", "auth"})


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient: the remote code (0 for none), its text, where."""

    recipient: str
    code: int
    text: str
    phase: Phase
    data_sent: bool
    source: Source = "smtp"

    @property
    def uncertain(self) -> bool:
        """The dot may have reached the server but no reply was recorded (I3)."""
        return self.code == 0 and self.data_sent

    @property
    def reply(self) -> str:
        """The reply as the remote sent it (``550 5.1.1 …``), or the text when there was none."""
        return reply_line(self.code, self.text)


def reply_line(code: int, text: str) -> str:
    """A reply's code and text as one line of evidence (``550 5.1.1 …``); code 0 (no
    reply) leaves the text alone."""
    if code == 0 or text.startswith(str(code)):
        return text
    return f"{code} {text}".rstrip()


@dataclass(frozen=True)
class Transaction:
    """One message for the recipients of one next hop; ``content`` is headers + body."""

    mail_from: str
    recipients: Sequence[str]
    content: bytes | AsyncIterable[bytes]
