"""Gauges computed when ``/metrics`` is scraped, and the TLS certificates' expiry (I7).

They read process memory only: a scrape while the store is down still answers, and the
age of the store-wide figures keeps growing until they are refreshed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509
from prometheus_client import Gauge

from mta.admin.metrics import Metrics
from mta.config import Settings


class JournalFigures(Protocol):
    """What the journal gauges read from a journal."""

    @property
    def backlog(self) -> int: ...

    @property
    def disk_bytes(self) -> int: ...


def export_scrape_gauges(metrics: Metrics, settings: Settings) -> QueueStatsAge:
    """The certificates' expiry, and the queue figures' age (returned, to be refreshed)."""
    export_certificates(metrics, {"smtp": settings.smtp.tls_cert_file,
                                  "admin": settings.admin.tls_cert_file})
    return QueueStatsAge(metrics)


class QueueStatsAge:
    """``mta_queue_stats_age_seconds``: seconds since the store-wide queue gauges were
    last refreshed (since the process started, before the first refresh)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._refreshed_at = clock()
        self.gauge = Gauge(
            "mta_queue_stats_age_seconds", "Seconds since the store-wide mta_queue_* gauges "
            "were refreshed; grows while the store is down.", registry=metrics.registry)
        self.gauge.set_function(self.age)

    def refreshed(self) -> None:
        """The queue gauges were just refreshed from the store."""
        self._refreshed_at = self._clock()

    def age(self) -> float:
        """Seconds since the last refresh."""
        return max(0.0, self._clock() - self._refreshed_at)


def export_journal(metrics: Metrics, journal: JournalFigures) -> None:
    """``mta_journal_backlog_records`` and ``mta_journal_backlog_bytes``, read at scrape."""
    Gauge("mta_journal_backlog_records", "Attempts in this process's journal whose outcome "
          "the store has not taken yet.", registry=metrics.registry,
          ).set_function(lambda: journal.backlog)
    Gauge("mta_journal_backlog_bytes", "Bytes of journal segments kept on disk until "
          "their attempts are applied.", registry=metrics.registry,
          ).set_function(lambda: journal.disk_bytes)


def certificate_expiry(path: Path) -> float:
    """Unix time at which the first certificate in the PEM file ``path`` expires."""
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return certificate.not_valid_after_utc.timestamp()


def export_certificates(metrics: Metrics, certificates: dict[str, Path | None]) -> None:
    """``mta_tls_certificate_expiry_timestamp_seconds{listener}`` for each configured
    certificate (``smtp``, ``admin``), read once: the listeners load them at start."""
    gauge = Gauge("mta_tls_certificate_expiry_timestamp_seconds",
                  "Unix time at which the listener's TLS certificate expires.",
                  ["listener"], registry=metrics.registry)
    for listener, path in certificates.items():
        if path is not None:
            gauge.labels(listener).set(certificate_expiry(path))
