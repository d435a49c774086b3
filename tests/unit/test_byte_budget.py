"""The sending budget: bytes of bodies in flight never pass the capacity."""

from __future__ import annotations

import asyncio

import pytest

from mta.concurrency import ByteBudget
from tests.support.nodes import wait_for


async def test_small_requests_share_the_capacity_and_a_big_one_waits_its_turn() -> None:
    budget = ByteBudget(100)
    first, second = await budget.acquire(40), await budget.acquire(40)
    assert budget.held == 80
    big = asyncio.ensure_future(budget.acquire(50))
    small = asyncio.ensure_future(budget.acquire(10))
    await wait_for(lambda: budget.waiting == 2, timeout=2)
    assert not big.done() and not small.done(), "first come, first served: small waits too"
    budget.release(first)
    assert await big == 50 and await small == 10
    assert budget.held == 100
    budget.release(second)
    budget.release(50)
    budget.release(10)
    assert budget.held == 0


async def test_a_request_over_the_capacity_gets_all_of_it_alone() -> None:
    budget = ByteBudget(100)
    held = await budget.acquire(10)
    huge = asyncio.ensure_future(budget.acquire(500))
    await wait_for(lambda: budget.waiting == 1, timeout=2)
    assert not huge.done()
    budget.release(held)
    assert await huge == 100 and budget.held == 100


async def test_a_cancelled_waiter_gives_way_and_takes_nothing() -> None:
    budget = ByteBudget(100)
    held = await budget.acquire(90)
    blocked = asyncio.ensure_future(budget.acquire(50))
    behind = asyncio.ensure_future(budget.acquire(5))
    await wait_for(lambda: budget.waiting == 2, timeout=2)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert await behind == 5 and budget.held == 95
    budget.release(held)
    budget.release(5)
    assert budget.held == 0


def test_a_budget_needs_a_positive_capacity() -> None:
    with pytest.raises(ValueError):
        ByteBudget(0)
