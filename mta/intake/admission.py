"""Admission control, like Postfix's queue_minfree: refuse before storage runs out."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import structlog

from mta.admin.metrics import Metrics
from mta.config import Settings
from mta.errors import StoreFull, StoreUnavailable
from mta.faults import fault_error
from mta.queue import Store

log = structlog.get_logger(__name__)

#: Seconds a free-disk reading stays fresh (accepted bytes are counted in between).
DISK_RECHECK_S = 1.0


class Admission:
    """Decides whether one more message of a given size may be accepted now."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics) -> None:
        self._store = store
        self._limits = settings.admission
        self._data_dir = Path(settings.node.data_dir)
        self._refresh_s = settings.database.queued_bytes_refresh
        self._metrics = metrics
        self._queued_bytes = 0
        self._accepted_since_refresh = 0
        self._free_disk = 0
        self._free_disk_read_at = -DISK_RECHECK_S

    def free_disk(self) -> int:
        """Free bytes on the data directory's filesystem (re-read at most once a second)."""
        now = time.monotonic()
        if now - self._free_disk_read_at >= DISK_RECHECK_S:
            self._free_disk = shutil.disk_usage(self._data_dir).free
            self._free_disk_read_at = now
        return self._free_disk

    def check(self, incoming_bytes: int) -> None:
        """Raise ``StoreFull`` if accepting ``incoming_bytes`` more would pass a limit."""
        free = self.free_disk()
        self._metrics.store_free_disk_bytes.set(free)
        if free - incoming_bytes < self._limits.min_free_disk:
            raise StoreFull(f"free disk {free} below min_free_disk {self._limits.min_free_disk}")
        limit = int(self._limits.max_queued_bytes)
        queued = self._queued_bytes + self._accepted_since_refresh
        if limit and queued + incoming_bytes > limit:
            raise StoreFull(f"queued bytes {queued} would pass max_queued_bytes {limit}")

    def note_accepted(self, size: int) -> None:
        """Count an accepted message until the next refresh reads it from the store."""
        self._accepted_since_refresh += size

    async def run_once(self) -> None:
        """Re-read the queued bytes from the store (the last value stays if it is down)."""
        fault_error("admission.refresh")
        try:
            queued = await self._store.queued_bytes()
        except StoreUnavailable as exc:
            log.warning("admission.refresh_failed", error=str(exc))
            return
        self._queued_bytes = queued
        self._accepted_since_refresh = 0
        self._metrics.store_queued_bytes.set(queued)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until ``stop`` is set."""
        while not stop.is_set():
            await self.run_once()
            try:
                await asyncio.wait_for(stop.wait(), self._refresh_s)
            except TimeoutError:
                continue
