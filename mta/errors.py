"""The project's error tree.

    MtaError
    ├── ConfigError           an operator's configuration is wrong (CLI exit 2)
    ├── BudgetExceeded        the connection budget does not fit the database (exit 2)
    ├── UnsafeDatabase        the database would not make a 250 durable (exit 2)
    ├── StoreRejected         the store refused a value itself: set aside, never retried
    ├── StaleTerm             a controller's change with an older term than the node's
    ├── TempFailure           retry later (SMTP 4xx)
    │   ├── StoreUnavailable  the store could not commit in time (451 4.3.0)
    │   ├── StoreFull         disk or queued bytes over their limit (452 4.3.1)
    │   └── RouteTempFailure  no next hop for now: SERVFAIL, DNS timeout, no usable host
    └── PermFailure           the peer must not retry (SMTP 5xx)
        └── RoutePermFailure  a permanent DNS answer: NXDOMAIN, null MX (RFC 7505)
"""

from __future__ import annotations

from mta.mail.text import outside_text


class MtaError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(MtaError):
    """A configuration value is missing, malformed or out of range."""


class BudgetExceeded(MtaError):
    """The connection budget of the configured processes exceeds the server's limit."""


class UnsafeDatabase(MtaError):
    """The database runs with fsync or synchronous_commit off."""


class StoreRejected(MtaError):
    """The store refused the data itself (a value it cannot hold, a broken constraint):
    trying again cannot help, so the record is set aside (DESIGN.md I3b)."""


class StaleTerm(MtaError):
    """A controller's mode change carried an older term than the node accepted: that
    controller lost its leadership (fencing)."""


class TempFailure(MtaError):
    """A transient failure: the peer should retry later."""


class StoreUnavailable(TempFailure):
    """The store could not be reached or could not commit within its timeout."""


class StoreFull(TempFailure):
    """Free disk or queued bytes passed their configured limit."""


class RouteTempFailure(TempFailure):
    """No next hop can be found for now; ``evidence`` says why (e.g. "SERVFAIL"), made
    safe: it quotes DNS data."""

    def __init__(self, evidence: str) -> None:
        evidence = outside_text(evidence)
        super().__init__(evidence)
        self.evidence = evidence


class PermFailure(MtaError):
    """A permanent failure: the peer must not retry (SMTP 5xx)."""


class RoutePermFailure(PermFailure):
    """DNS proved the domain undeliverable; ``evidence`` is the answer, kept for I2.

    ``cache_for`` is how many seconds that answer stays true (its TTL).
    """

    def __init__(self, evidence: str, *, cache_for: float = 0.0) -> None:
        evidence = outside_text(evidence)
        super().__init__(evidence)
        self.evidence = evidence
        self.cache_for = cache_for
