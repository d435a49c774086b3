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

from mta.errors import StoreRejected
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
            try:
                await self._store.record_outcomes(
                    self._owner, [outcome for outcomes, _ in batch for outcome in outcomes])
            except StoreRejected as exc:
                if len(batch) == 1:
                    _settle(batch, exc)
                    continue
                # One caller's values were refused: each caller alone, so that only
                # its own outcomes are refused.
                for one in batch:
                    try:
                        await self._store.record_outcomes(self._owner, one[0])
                    except Exception as exc:
                        _settle([one], exc)
                    else:
                        _settle([one], None)
            except Exception as exc:  # every caller of this batch gets it
                _settle(batch, exc)
            else:
                _settle(batch, None)


def _settle(batch: Sequence[tuple[Sequence[AttemptOutcome], asyncio.Future[None]]],
            error: BaseException | None) -> None:
    """Tell each caller of ``batch`` its result (``error``, or committed)."""
    for _, done in batch:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
            done.exception()  # retrieved: a cancelled caller no longer waits
