"""Small asyncio helpers shared by the store, intake and delivery."""

from __future__ import annotations

import asyncio
from collections import deque


async def acquire_within(semaphore: asyncio.Semaphore, timeout: float) -> bool:
    """Acquire ``semaphore`` within ``timeout`` seconds; False if it stayed taken.

    A free semaphore is taken at once, without the task that ``wait_for`` creates.
    """
    if not semaphore.locked():
        await semaphore.acquire()
        return True
    try:
        await asyncio.wait_for(semaphore.acquire(), timeout)
    except TimeoutError:
        return False
    return True


class ByteBudget:
    """At most ``capacity`` bytes held at once, granted first come, first served.

    A request for more than the capacity is granted the whole capacity once nothing
    else is held, so any single item can always proceed.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a byte budget needs a positive capacity")
        self.capacity = capacity
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> int:
        """Wait until ``size`` bytes fit; returns the amount to ``release`` later."""
        amount = min(max(size, 1), self.capacity)
        if not self._waiters and self.held + amount <= self.capacity:
            self.held += amount
            return amount
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((amount, granted))
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(amount)  # granted just as the waiter was cancelled
            else:
                granted.cancel()
                self._grant()
            raise
        return amount

    @property
    def waiting(self) -> int:
        """Requests waiting for bytes now."""
        return sum(1 for _, granted in self._waiters if not granted.done())

    def release(self, amount: int) -> None:
        """Give back what ``acquire`` returned."""
        self.held -= amount
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            amount, granted = self._waiters[0]
            if granted.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.held + amount > self.capacity:
                return
            self._waiters.popleft()
            self.held += amount
            granted.set_result(None)
