"""Group commit for delivery outcomes: concurrent sends share one statement and commit.

Each finished send has a few outcomes to record. Written one statement each, a busy
node pays a round trip, a commit and a WAL flush per message. ``OutcomeBatcher`` lets
them queue while a write is in flight and writes everything queued in the next one, so
under load many groups commit together and, when idle, a lone group is written at once.
Every caller still waits until its own outcomes are committed (or gets the error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mta.queue.batching import write_batch
from mta.queue.records import AttemptOutcome
from mta.queue.store import Store

__all__ = ["MAX_BATCH_OUTCOMES", "OutcomeBatcher"]

#: The most outcomes written in one statement.
MAX_BATCH_OUTCOMES = 500


class OutcomeBatcher:
    """Writes the outcomes of one lease owner, batching the callers that overlap."""

    def __init__(self, store: Store, owner: str) -> None:
        self._store = store
        self._owner = owner
        self._queued: list[tuple[Sequence[AttemptOutcome], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, outcomes: Sequence[AttemptOutcome]) -> None:
        """Record ``outcomes`` (``Store.record_outcomes``) together with any queued now."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((outcomes, done))
        if self._writer is None or self._writer.done():
            # A task of its own: a caller that is cancelled does not cancel the others.
            self._writer = asyncio.create_task(self._write_queued(), name="outcome-writer")
        await asyncio.shield(done)

    async def _write_queued(self) -> None:
        while self._queued:
            batch: list[tuple[Sequence[AttemptOutcome], asyncio.Future[None]]] = []
            count = 0
            while self._queued and (not batch or
                                    count + len(self._queued[0][0]) <= MAX_BATCH_OUTCOMES):
                outcomes, done = self._queued.pop(0)
                batch.append((outcomes, done))
                count += len(outcomes)
            await write_batch(batch, self._write_all, self._write_one)

    async def _write_all(self, batch: list[Sequence[AttemptOutcome]]) -> None:
        await self._store.record_outcomes(
            self._owner, [outcome for outcomes in batch for outcome in outcomes])

    async def _write_one(self, outcomes: Sequence[AttemptOutcome]) -> None:
        await self._store.record_outcomes(self._owner, outcomes)
