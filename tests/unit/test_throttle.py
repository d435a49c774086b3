"""Per-destination shaping on virtual time: windows, dead destinations, caps, rates."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mta.delivery.shaping import DestinationState, Shaper, ShapingConfig


class FakeTime:
    """A virtual clock whose sleepers wake only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, future))
        await future

    @property
    def sleeping(self) -> int:
        return sum(not future.done() for _, future in self._sleepers)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, future in self._sleepers:
            if deadline <= self.now and not future.done():
                future.set_result(None)
        self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]
        await settle()


async def settle() -> None:
    """Let every runnable task run until nothing changes."""
    for _ in range(20):
        await asyncio.sleep(0)


class Holder:
    """A task that holds a slot until released."""

    def __init__(self, shaper: Shaper, key: str) -> None:
        self.granted = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(shaper, key))

    async def _run(self, shaper: Shaper, key: str) -> None:
        async with shaper.slot(key):
            self.granted.set()
            await self.release.wait()

    async def done(self) -> None:
        self.release.set()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def make(fake: FakeTime, **kwargs: Any) -> Shaper:
    return Shaper(ShapingConfig(**kwargs), clock=fake.clock, sleep=fake.sleep)


@contextlib.asynccontextmanager
async def holders(shaper: Shaper, key: str, count: int) -> AsyncIterator[list[Holder]]:
    """``count`` holders of ``key``; cancelled on exit."""
    started = [Holder(shaper, key) for _ in range(count)]
    await settle()
    try:
        yield started
    finally:
        for holder in started:
            holder.task.cancel()
        await asyncio.gather(*(h.task for h in started), return_exceptions=True)


def test_invalid_configs_are_rejected() -> None:
    cases: list[dict[str, Any]] = [
        {"max_connections_per_destination": 0},
        {"initial_window": 0},
        {"initial_window": 21},
        {"messages_per_minute": 0.0},
        {"global_concurrency": 0},
        {"dead_cooloff": -1.0},
        {"burst": 0.5},
        {"max_destinations": 0},
    ]
    for kwargs in cases:
        with pytest.raises(ValueError):
            ShapingConfig(**kwargs)


def test_window_grows_per_success_up_to_max(fake: FakeTime) -> None:
    shaper = make(fake, max_connections_per_destination=7, initial_window=5)
    assert shaper.state("a").window == 5
    for _ in range(5):
        shaper.record_success("a")
    assert shaper.state("a") == DestinationState(7, 0, None, 0, 5)


def test_window_shrinks_per_failure_then_dies(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=3, dead_cooloff=60.0)
    shaper.record_failure("a")
    shaper.record_failure("a")
    assert shaper.state("a").window == 1
    assert shaper.available("a")
    shaper.record_failure("a")
    assert shaper.state("a") == DestinationState(0, 0, fake.now + 60.0, 3, 0)
    assert not shaper.available("a")


def test_failures_while_dead_do_not_extend_the_cooloff(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=1, dead_cooloff=60.0)
    shaper.record_failure("a")
    dead_until = fake.now + 60.0
    fake.now += 30.0
    shaper.record_failure("a")
    shaper.record_success("a")
    assert shaper.state("a") == DestinationState(0, 0, dead_until, 2, 1)


def test_dead_destination_revives_with_window_of_one_after_cooloff(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=1, dead_cooloff=60.0)
    shaper.record_failure("a")
    fake.now += 59.9
    assert not shaper.available("a")
    fake.now += 0.1
    assert shaper.available("a")
    state = shaper.state("a")
    assert (state.window, state.dead_until) == (1, None)
    shaper.record_success("a")
    assert shaper.state("a").window == 2


async def test_slot_for_dead_destination_waits_for_the_cooloff(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=1, dead_cooloff=60.0)
    shaper.record_failure("a")
    async with holders(shaper, "a", 1) as (waiter,):
        assert not waiter.granted.is_set()
        assert shaper.state("a").waiting == 1
        await fake.advance(59.0)
        assert not waiter.granted.is_set()
        await fake.advance(1.0)
        assert waiter.granted.is_set()
        assert shaper.state("a").in_use == 1


async def test_window_limits_slots_and_release_admits_the_next(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=2)
    async with holders(shaper, "a", 3) as (first, second, third):
        assert first.granted.is_set() and second.granted.is_set()
        assert not third.granted.is_set()
        assert not shaper.available("a")
        assert shaper.state("a").in_use == 2
        await first.done()
        await asyncio.wait_for(third.granted.wait(), 5)
        assert shaper.state("a").in_use == 2


async def test_success_widens_the_window_for_a_waiter(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=1)
    async with holders(shaper, "a", 2) as (first, second):
        assert first.granted.is_set() and not second.granted.is_set()
        shaper.record_success("a")
        await asyncio.wait_for(second.granted.wait(), 5)


async def test_full_hung_destination_does_not_starve_others(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=2, global_concurrency=10)
    async with holders(shaper, "slow.example", 5) as stuck:
        assert sum(h.granted.is_set() for h in stuck) == 2
        assert shaper.state("slow.example").waiting == 3
        assert shaper.available("fast.example")
        async with asyncio.timeout(5):
            async with shaper.slot("fast.example"):
                assert shaper.state("fast.example").in_use == 1
        shaper.record_failure("slow.example")
        shaper.record_failure("slow.example")
        assert shaper.state("slow.example").dead_until is not None
        async with asyncio.timeout(5), shaper.slot("other.example"):
            pass
    assert shaper.global_in_use == 0


async def test_global_limit_spans_destinations(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=5, global_concurrency=3)
    async with holders(shaper, "a", 2) as a, holders(shaper, "b", 2) as b:
        granted = [h for h in a + b if h.granted.is_set()]
        assert len(granted) == 3
        assert shaper.global_in_use == 3
        assert not shaper.available("c")
        waiting = next(h for h in a + b if not h.granted.is_set())
        await granted[0].done()
        await asyncio.wait_for(waiting.granted.wait(), 5)
        assert shaper.global_in_use == 3


async def test_token_bucket_paces_messages_on_the_clock(fake: FakeTime) -> None:
    shaper = make(fake, messages_per_minute=6.0)  # one token per 10 s, burst of one
    async with shaper.slot("a"):
        pass
    assert not shaper.available("a")
    assert shaper.available("b")
    async with holders(shaper, "a", 1) as (waiter,):
        assert not waiter.granted.is_set()
        assert fake.sleeping == 1
        await fake.advance(9.0)
        assert not waiter.granted.is_set()
        await fake.advance(1.0)
        assert waiter.granted.is_set()


async def test_token_bucket_burst_and_rate_over_a_minute(fake: FakeTime) -> None:
    shaper = make(fake, messages_per_minute=60.0, burst=5.0)
    sent = 0
    while shaper.available("a"):
        async with shaper.slot("a"):
            sent += 1
    assert sent == 5
    for _ in range(60):
        fake.now += 1.0
        while shaper.available("a"):
            async with shaper.slot("a"):
                sent += 1
    assert sent == 65


async def test_cancelled_waiter_holds_nothing(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=1)
    async with holders(shaper, "a", 2) as (first, second):
        second.task.cancel()
        await settle()
        assert shaper.state("a").waiting == 0
        await first.done()
    assert shaper.state("a").in_use == 0
    assert shaper.global_in_use == 0


async def test_slot_is_released_when_the_body_raises(fake: FakeTime) -> None:
    shaper = make(fake, initial_window=1)
    with pytest.raises(RuntimeError):
        async with shaper.slot("a"):
            raise RuntimeError("send failed")
    assert shaper.available("a")
    assert shaper.global_in_use == 0


def test_unknown_destinations_are_not_tracked_by_queries(fake: FakeTime) -> None:
    shaper = make(fake)
    assert shaper.available("x")
    assert shaper.state("x") == DestinationState(5, 0, None, 0, 0)
    assert len(shaper) == 0


async def test_memory_is_bounded_by_evicting_idle_destinations(fake: FakeTime) -> None:
    shaper = make(fake, max_destinations=10, initial_window=1)
    shaper.record_failure("dead")
    async with holders(shaper, "busy", 1):
        for n in range(1000):
            async with shaper.slot(f"d{n}.example"):
                pass
            assert len(shaper) <= 10
        # Which destinations are tracked (memory), not what a query would answer.
        tracked = shaper._destinations
        assert "busy" in tracked and shaper.state("busy").in_use == 1
        assert "dead" in tracked and shaper.state("dead").window == 0
        assert "d999.example" in tracked
        assert "d0.example" not in tracked


async def test_dead_destinations_are_evicted_last(fake: FakeTime) -> None:
    shaper = make(fake, max_destinations=3, initial_window=1)
    for key in ("x", "y", "z"):
        shaper.record_failure(key)
    shaper.record_success("fresh")
    assert len(shaper) == 3
    assert set(shaper._destinations) == {"y", "z", "fresh"}


def test_a_dead_destination_is_suspended_with_the_failure_that_killed_it(
    fake: FakeTime,
) -> None:
    shaper = make(fake, initial_window=2, dead_cooloff=60.0)
    assert shaper.suspended("a") is None, "unknown destinations may be tried"
    shaper.record_failure("a", "connection refused")
    assert shaper.suspended("a") is None, "still has a window of one"
    shaper.record_failure("a", "timeout waiting for the greeting")
    assert shaper.suspended("a") == "timeout waiting for the greeting"
    fake.now += 60.0
    assert shaper.suspended("a") is None, "revived after the cool-off"
