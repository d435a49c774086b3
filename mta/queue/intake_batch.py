"""Group commit at intake: concurrent sessions' messages share one transaction and one
WAL flush, and each session still gets its ``250`` only after that commit (I1).

While every writer is busy committing, newly read messages queue; the next free writer
commits all of them (up to :data:`MAX_BATCH_MESSAGES`) in one pipelined round trip. A
lone message on an idle node is written at once, as before. Large bodies are not
batched: they are streamed on their own (:mod:`mta.queue.message_copy`).
"""

from __future__ import annotations

import asyncio

from mta.queue.batching import write_batch
from mta.queue.message_copy import STREAM_BODY_BYTES
from mta.queue.records import NewMessage
from mta.queue.store import Store

__all__ = ["MAX_BATCH_MESSAGES", "EnqueueBatcher"]

#: The most messages committed in one transaction.
MAX_BATCH_MESSAGES = 64
#: The most bytes of bodies committed in one transaction (beyond the first message).
MAX_BATCH_BYTES = 4 * 1024 * 1024

_Queued = tuple[NewMessage, asyncio.Future[None]]


class EnqueueBatcher:
    """Commits messages for intake, at most ``writers`` transactions at once."""

    def __init__(self, store: Store, writers: int) -> None:
        """``writers``: the intake share of the pool (``node.intake_db_slots``)."""
        self._store = store
        self._writers = writers
        self._busy = 0
        self._queued: list[_Queued] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def enqueue(self, message: NewMessage) -> None:
        """Commit ``message`` durably (with any queued beside it), or raise as
        ``Store.enqueue`` does."""
        if len(message.body) >= STREAM_BODY_BYTES:
            await self._store.enqueue(message)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((message, done))
        if self._busy < self._writers:
            # A task of its own: a session that is cancelled does not cancel the others.
            self._busy += 1
            task = asyncio.create_task(self._write_queued(), name="enqueue-writer")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(done)

    async def _write_queued(self) -> None:
        try:
            while self._queued:
                await write_batch(self._take(), self._store.enqueue_many,
                                  self._store.enqueue)
        finally:
            self._busy -= 1

    def _take(self) -> list[_Queued]:
        """The next batch: queued messages up to the count and byte limits."""
        batch: list[_Queued] = []
        size = 0
        while self._queued and len(batch) < MAX_BATCH_MESSAGES:
            message = self._queued[0][0]
            if batch and size + len(message.body) > MAX_BATCH_BYTES:
                break
            batch.append(self._queued.pop(0))
            size += len(message.body)
        return batch
