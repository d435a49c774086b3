"""Retry policy: backoff delays, outcome classification and RFC 3463 status codes.

Pure logic, no I/O. The defaults are Postfix's: ``minimal_backoff_time`` 300 s,
``maximal_backoff_time`` 4000 s and ``maximal_queue_lifetime`` 5 d.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from mta.config import DeliverySection, UncertainMode
from mta.queue.records import OutcomeState

__all__ = [
    "Decision",
    "RetryPolicy",
    "classify",
    "classify_dns",
    "next_attempt_delay",
    "status_for",
]

# Capping the exponent keeps 2**n a finite float; 64 doublings exceed any cap.
_MAX_DOUBLINGS = 64

_ENHANCED = re.compile(
    r"^\s*(?:\d{3}[ -])?\s*([245])\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})(?=\s|$)"
)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again and when to give up.

    ``minimal_backoff``: Postfix ``minimal_backoff_time`` (300 s), the first delay.
    ``maximal_backoff``: Postfix ``maximal_backoff_time`` (4000 s), the delay cap.
    ``max_lifetime``: Postfix ``maximal_queue_lifetime`` (5 days); a deferral past it fails.
    ``jitter``: each delay is multiplied by a random factor in ``[1-jitter, 1+jitter]``.
    """

    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    max_lifetime: float = 5 * 86400.0
    jitter: float = 0.2

    @classmethod
    def from_settings(cls, delivery: DeliverySection) -> RetryPolicy:
        """The policy the ``[delivery]`` backoff and lifetime settings set."""
        return cls(minimal_backoff=delivery.minimal_backoff,
                   maximal_backoff=delivery.maximal_backoff, max_lifetime=delivery.max_lifetime)

    def __post_init__(self) -> None:
        if self.minimal_backoff <= 0:
            raise ValueError("minimal_backoff must be positive")
        if self.maximal_backoff < self.minimal_backoff:
            raise ValueError("maximal_backoff must be at least minimal_backoff")
        if self.max_lifetime <= 0:
            raise ValueError("max_lifetime must be positive")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")


@dataclass(frozen=True)
class Decision:
    """What an attempt's result means for the delivery, and why."""

    outcome: OutcomeState
    possible_duplicate: bool
    reason: str


def next_attempt_delay(policy: RetryPolicy, attempts: int, rng: random.Random) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones (``attempts >= 1``).

    ``minimal * 2^(attempts-1)``, capped at ``maximal``, times a jitter factor.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    base = min(policy.maximal_backoff,
               policy.minimal_backoff * 2.0 ** min(attempts - 1, _MAX_DOUBLINGS))
    return base * rng.uniform(1.0 - policy.jitter, 1.0 + policy.jitter)


def classify(
    code: int,
    data_sent: bool,
    *,
    age: float,
    policy: RetryPolicy,
    uncertain_mode: UncertainMode = "uncertain",
    before_mail: bool = False,
) -> Decision:
    """Classify an attempt's final reply ``code`` (0: network error, no reply).

    ``data_sent`` means the final ``.`` of DATA may have reached the server; ``age`` is
    seconds since the message was accepted. Under ``uncertain_mode="retry"`` a missing
    reply to the dot defers with ``possible_duplicate`` instead of ``uncertain``.
    ``before_mail`` marks a reply to the session's setup (greeting, EHLO, STARTTLS,
    AUTH): even a 5xx there says nothing about the recipients, so it defers (Postfix's
    ``smtp_skip_5xx_greeting`` and ``smtp_sasl_auth_soft_bounce``) until expiry.
    """
    if not (code == 0 or 100 <= code <= 599):
        raise ValueError(f"not an SMTP reply code: {code}")
    if 200 <= code < 300:
        return Decision("delivered", False, f"{code} reply")
    if code >= 500 and before_mail:
        return _defer(f"{code} reply before MAIL", age, policy, possible_duplicate=False)
    if code >= 500:
        return Decision("failed", False, f"{code} reply")
    if code >= 400:
        return _defer(f"{code} reply", age, policy, possible_duplicate=False)
    # No usable reply: a network error (0) or a protocol violation (1xx/3xx).
    what = "network error" if code == 0 else f"unexpected {code} reply"
    if not data_sent:
        return _defer(f"{what} before data", age, policy, possible_duplicate=False)
    if uncertain_mode == "uncertain":
        return Decision("uncertain", False, f"{what} after end of data")
    return _defer(f"{what} after end of data", age, policy, possible_duplicate=True)


def reply_lost(code: int, data_sent: bool) -> bool:
    """The final dot may have reached the server and no usable reply to it came (a
    network error, code 0, or a 1xx/3xx no server may send there)."""
    return data_sent and code // 100 not in (2, 4, 5)


def classify_dns(permanent: bool, *, age: float, policy: RetryPolicy) -> Decision:
    """Classify a routing answer: a permanent DNS answer (NXDOMAIN, null MX) fails, a
    temporary one (SERVFAIL, a timeout, no usable host) defers until the lifetime ends."""
    if permanent:
        return Decision("failed", False, "permanent DNS answer")
    return _defer("temporary DNS failure", age, policy, possible_duplicate=False)


def _defer(reason: str, age: float, policy: RetryPolicy, *, possible_duplicate: bool) -> Decision:
    """Defer, or fail as ``expired`` once ``age`` reaches the maximum lifetime."""
    if age >= policy.max_lifetime:
        return Decision("failed", possible_duplicate, "expired")
    return Decision("deferred", possible_duplicate, reason)


def status_for(code: int, text: str) -> str:
    """The RFC 3463 enhanced status code in ``text``, else one derived from ``code``.

    ``text`` may start with the reply code (``"550 5.1.1 no such user"``). An enhanced
    code whose class disagrees with ``code`` is ignored.
    """
    derived = "2" if 200 <= code < 300 else "5" if 500 <= code < 600 else "4"
    match = _ENHANCED.match(text)
    if match and match.group(1) == derived:
        return ".".join(match.groups())
    return f"{derived}.0.0"
