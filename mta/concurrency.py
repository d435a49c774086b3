"""Small asyncio helpers shared by the store and intake."""

from __future__ import annotations

import asyncio


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
