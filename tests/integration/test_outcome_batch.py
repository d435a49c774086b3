"""Group commit of outcomes: overlapping writers share statements, each learns its fate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from mta.config import Settings
from mta.errors import StoreUnavailable
from mta.queue import Store
from mta.queue.outcome_batch import MAX_BATCH_OUTCOMES, OutcomeBatcher
from mta.queue.records import AttemptOutcome
from tests.integration.test_delivery_states import enqueue


class CountingStore(Store):
    """The real store, counting ``record_outcomes`` statements; can fail the next ones."""

    statements: list[int]
    fail_next: int

    async def record_outcomes(self, owner: str, outcomes: Sequence[AttemptOutcome], *,
                              bounce: object = None) -> set[int]:
        self.statements.append(len(outcomes))
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailable("the store is down (test)")
        return await super().record_outcomes(owner, outcomes)


@pytest.fixture
async def store(db_dsn: str, make_settings: Callable[..., Settings]
                ) -> AsyncIterator[CountingStore]:
    opened = await CountingStore.open(db_dsn, make_settings())
    assert isinstance(opened, CountingStore)
    opened.statements, opened.fail_next = [], 0
    try:
        yield opened
    finally:
        await opened.close()


async def leased(store: Store, count: int) -> list[int]:
    for _ in range(count):
        await enqueue(store, 1)
    return [d.id for d in await store.claim_due("owner", count, 60.0)]


async def test_overlapping_writers_share_statements_and_all_are_applied(
    store: CountingStore,
) -> None:
    for _ in range(40):
        await enqueue(store, 1)
    claimed = await store.claim_due("owner", 40, 60.0)
    batcher = OutcomeBatcher(store, "owner")
    await asyncio.gather(*(batcher.write([AttemptOutcome(d.id, "delivered", 250, "250 ok")])
                           for d in claimed))
    # All 40 queued before the writer ran: one statement.
    assert store.statements == [40]
    for delivery in claimed:
        (row,) = await store.deliveries(delivery.message_id)
        assert (row.state, row.last_reply, row.lease_owner) == ("delivered", "250 ok", None)


async def test_a_failed_statement_fails_every_writer_in_it_and_the_next_one_goes_on(
    store: CountingStore,
) -> None:
    ids = await leased(store, 3)
    batcher = OutcomeBatcher(store, "owner")
    store.fail_next = 1
    results = await asyncio.gather(
        *(batcher.write([AttemptOutcome(i, "delivered", 250, "250 ok")]) for i in ids),
        return_exceptions=True)
    assert store.statements == [3]
    assert all(isinstance(result, StoreUnavailable) for result in results), results
    await batcher.write([AttemptOutcome(i, "delivered", 250, "250 ok") for i in ids])
    assert store.statements == [3, 3]
    assert await store.record_outcomes("owner", [
        AttemptOutcome(i, "delivered", 250, "ok") for i in ids]) == set()


async def test_a_cancelled_writer_does_not_cancel_the_statement(store: CountingStore) -> None:
    ids = await leased(store, 2)
    batcher = OutcomeBatcher(store, "owner")
    first = asyncio.ensure_future(batcher.write([AttemptOutcome(ids[0], "delivered", 250, "ok")]))
    second = asyncio.ensure_future(batcher.write([AttemptOutcome(ids[1], "delivered", 250, "ok")]))
    await asyncio.sleep(0)  # both queued, the first statement started
    first.cancel()
    await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await store.record_outcomes("owner", [
        AttemptOutcome(i, "delivered", 250, "ok") for i in ids]) == set(), \
        "both were applied: the cancelled writer's statement ran to its end"


async def test_a_batch_never_exceeds_its_outcome_limit(store: CountingStore) -> None:
    ids = await leased(store, 4)
    batcher = OutcomeBatcher(store, "owner")
    big = [AttemptOutcome(ids[0], "delivered", 250, "ok")] * (MAX_BATCH_OUTCOMES - 1)
    await asyncio.gather(
        batcher.write([AttemptOutcome(ids[1], "delivered", 250, "ok")]),
        batcher.write(big),
        batcher.write([AttemptOutcome(ids[2], "delivered", 250, "ok")] * 2),
        batcher.write([AttemptOutcome(ids[3], "delivered", 250, "ok")]),
    )
    # 1 + 499 fill the first statement; the next writer would pass the limit.
    assert store.statements == [MAX_BATCH_OUTCOMES, 3]
