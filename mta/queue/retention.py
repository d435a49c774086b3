"""Retention: finished mail leaves the store in small batches, bodies first (I5)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog

from mta.errors import StoreUnavailable
from mta.queue.store import Store

log = structlog.get_logger(__name__)

#: Batches per round: a round never runs long, and intake keeps its connections.
MAX_BATCHES_PER_ROUND = 20


@dataclass(frozen=True)
class PurgeCounts:
    """What one round removed."""

    bodies: int
    messages: int


class Retention:
    """Drops bodies, then whole messages, once they have been done long enough."""

    def __init__(self, store: Store, *, body_after_s: float, metadata_after_s: float,
                 audit_after_s: float, batch: int, interval_s: float) -> None:
        self._store = store
        self._audit_after = audit_after_s
        self._body_after = body_after_s
        self._metadata_after = max(metadata_after_s, body_after_s)
        self._batch = batch
        self._interval = interval_s

    async def run_once(self) -> PurgeCounts:
        """One bounded round of purging."""
        bodies = messages = 0
        for _ in range(MAX_BATCHES_PER_ROUND):
            done = await self._store.purge_bodies(self._body_after, self._batch)
            bodies += done
            if done < self._batch:
                break
        for _ in range(MAX_BATCHES_PER_ROUND):
            done = await self._store.purge_messages(self._metadata_after, self._batch)
            messages += done
            if done < self._batch:
                break
        owners = await self._store.purge_journal_owners(self._metadata_after, self._batch)
        audit = await self._store.purge_audit(self._audit_after, self._batch)
        if bodies or messages or owners or audit:
            log.info("retention.purged", bodies=bodies, messages=messages,
                     journal_owners=owners, audit=audit)
        return PurgeCounts(bodies, messages)

    async def run(self, stop: asyncio.Event) -> None:
        """Purge every ``interval_s`` until ``stop``; a store outage only delays it."""
        while not stop.is_set():
            try:
                await self.run_once()
            except StoreUnavailable as exc:
                log.warning("retention.store_unavailable", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
