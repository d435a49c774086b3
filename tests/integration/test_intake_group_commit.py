"""Group commit at intake (issue 13): messages that arrive while the writers are busy
share one transaction, and no caller returns before its own message is committed (I1)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg

from mta.errors import StoreRejected
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from mta.queue.intake_batch import EnqueueBatcher


class CountingStore:
    """The real store, noting the size of each group it commits."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[int] = []

    async def enqueue_many(self, messages: Sequence[NewMessage]) -> None:
        self.batches.append(len(messages))
        await self.store.enqueue_many(messages)

    async def enqueue(self, message: NewMessage) -> None:
        self.batches.append(1)
        await self.store.enqueue(message)


def message(n: int, message_id: uuid.UUID | None = None) -> NewMessage:
    return NewMessage(id=message_id or new_message_id(), mail_from="a@example.org",
                      recipients=[f"r{n}@example.com"], trace_headers=b"",
                      body=f"Subject: {n}\r\n\r\nbody\r\n".encode(),
                      client_address="127.0.0.1", helo_name="h", auth_user=None,
                      message_id_header=f"<g{n}@test>")


async def stored(db_dsn: str, message_id: uuid.UUID) -> bool:
    conn = await asyncpg.connect(db_dsn)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) FROM deliveries WHERE message_id = $1", message_id))
    finally:
        await conn.close()


async def test_concurrent_messages_share_commits_and_each_waits_for_its_own(
    store: Store, db_dsn: str
) -> None:
    counting = CountingStore(store)
    batcher = EnqueueBatcher(counting, writers=1)  # type: ignore[arg-type]
    messages = [message(n) for n in range(40)]
    seen_committed: list[bool] = []

    async def submit(one: NewMessage) -> None:
        await batcher.enqueue(one)
        seen_committed.append(await stored(db_dsn, one.id))  # I1: committed before 250

    await submit(messages[0])
    assert counting.batches == [1], "a message on an idle intake is written at once"

    # 39 sessions at once: they queue behind the one writer and commit together.
    await asyncio.gather(*(submit(one) for one in messages[1:]))
    assert seen_committed == [True] * 40
    assert sum(counting.batches) == 40
    assert len(counting.batches) < 40 and max(counting.batches) > 1, counting.batches


async def test_a_refused_message_fails_alone(store: Store, db_dsn: str) -> None:
    """One message of a group is refused (its id is taken): the group is retried one by
    one, so only that session gets the error and the others are committed."""
    taken = message(0)
    await store.enqueue(taken)
    batcher = EnqueueBatcher(store, writers=1)
    first = message(1)
    group = [message(2), message(3, taken.id), message(4)]
    results = await asyncio.gather(batcher.enqueue(first),
                                   *(batcher.enqueue(one) for one in group),
                                   return_exceptions=True)
    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], StoreRejected)
    for one in (first, group[0], group[2]):
        assert await stored(db_dsn, one.id)
