"""Per-destination delivery shaping: concurrency windows, rate limits, a global cap.

Each destination (next hop) has a concurrency window, like Postfix's qmgr
(``qmgr_queue.c``): it starts at ``initial_window``, grows by one per success up to
``max_connections_per_destination``, shrinks by one per failure (connect failure,
4xx, timeout), and at zero the destination is dead until ``dead_cooloff`` seconds
have passed; it then gets a window of one again. An optional token bucket limits
messages per minute per destination, and ``global_concurrency`` caps slots across
all destinations. A destination that is full or dead never blocks another one.

Time comes from an injected ``clock`` and waits from an injected ``sleep``, so tests
run on virtual time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mta.config import DeliverySection

__all__ = ["DestinationState", "Shaper", "ShapingConfig"]

#: A destination's first concurrency window (Postfix's ``initial_destination_concurrency``).
INITIAL_WINDOW = 5


@dataclass(frozen=True)
class ShapingConfig:
    """Limits for :class:`Shaper`.

    ``messages_per_minute`` (None: unlimited) refills a token bucket that holds at most
    ``burst`` tokens (default: one second's worth, at least one). ``max_destinations``
    bounds memory: idle destinations beyond it are forgotten, least recently used first.
    """

    max_connections_per_destination: int = 20
    initial_window: int = INITIAL_WINDOW
    messages_per_minute: float | None = None
    global_concurrency: int = 100
    dead_cooloff: float = 60.0
    burst: float | None = None
    max_destinations: int = 10_000

    @classmethod
    def from_settings(cls, delivery: DeliverySection) -> ShapingConfig:
        """The limits the ``[delivery]`` settings set; the window starts at five or less."""
        return cls(max_connections_per_destination=delivery.max_connections_per_destination,
                   initial_window=min(INITIAL_WINDOW, delivery.max_connections_per_destination),
                   messages_per_minute=delivery.messages_per_minute,
                   global_concurrency=delivery.global_concurrency)

    def __post_init__(self) -> None:
        if self.max_connections_per_destination < 1:
            raise ValueError("max_connections_per_destination must be at least 1")
        if not 1 <= self.initial_window <= self.max_connections_per_destination:
            raise ValueError("initial_window must be in [1, max_connections_per_destination]")
        if self.messages_per_minute is not None and self.messages_per_minute <= 0:
            raise ValueError("messages_per_minute must be positive")
        if self.global_concurrency < 1:
            raise ValueError("global_concurrency must be at least 1")
        if self.dead_cooloff < 0:
            raise ValueError("dead_cooloff must not be negative")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be at least 1")
        if self.max_destinations < 1:
            raise ValueError("max_destinations must be at least 1")

    @property
    def bucket_capacity(self) -> float:
        """Tokens the bucket holds when full."""
        if self.burst is not None:
            return self.burst
        rate = self.messages_per_minute or 0.0
        return max(1.0, rate / 60.0)


@dataclass(frozen=True)
class DestinationState:
    """A destination's shaping state, for metrics and the claim loop."""

    window: int
    in_use: int
    dead_until: float | None
    failures: int
    successes: int
    waiting: int = 0


class _Destination:
    """Mutable per-destination bookkeeping."""

    __slots__ = (
        "dead_until",
        "failures",
        "in_use",
        "last_failure",
        "stamp",
        "successes",
        "tokens",
        "waiting",
        "window",
    )

    def __init__(self, window: int, tokens: float, now: float) -> None:
        self.window = window
        self.in_use = 0
        self.waiting = 0
        self.dead_until: float | None = None
        self.failures = 0
        self.last_failure = ""
        self.successes = 0
        self.tokens = tokens
        self.stamp = now

    def snapshot(self) -> DestinationState:
        return DestinationState(self.window, self.in_use, self.dead_until,
                                self.failures, self.successes, self.waiting)


class Shaper:
    """Grants delivery slots per destination; see the module docstring."""

    def __init__(
        self,
        config: ShapingConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._rate = (config.messages_per_minute / 60.0
                      if config.messages_per_minute is not None else None)
        self._destinations: OrderedDict[str, _Destination] = OrderedDict()
        self._global_in_use = 0
        self._changed = asyncio.Event()

    @property
    def global_in_use(self) -> int:
        """Slots held across all destinations."""
        return self._global_in_use

    def __len__(self) -> int:
        """Number of destinations tracked now."""
        return len(self._destinations)

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold a connection slot for ``key``, waiting for window, global cap and token."""
        await self._acquire(key)
        try:
            yield
        finally:
            self._release(key)

    def record_success(self, key: str) -> None:
        """A delivery to ``key`` got a reply: widen its window by one (a dead one stays dead)."""
        entry = self._entry(key)
        self._refresh(entry, self._clock())
        entry.successes += 1
        if entry.dead_until is None and entry.window < self.config.max_connections_per_destination:
            entry.window += 1
            self._notify()

    def record_failure(self, key: str, evidence: str = "") -> None:
        """Connect failure, 4xx or timeout at ``key``: shrink its window; at zero it is dead."""
        entry = self._entry(key)
        now = self._clock()
        self._refresh(entry, now)
        entry.failures += 1
        entry.last_failure = evidence
        if entry.dead_until is not None:
            return
        entry.window -= 1
        if entry.window <= 0:
            entry.window = 0
            entry.dead_until = now + self.config.dead_cooloff

    def suspended(self, key: str) -> str | None:
        """While ``key`` is dead, the failure that killed it; None when it may be tried."""
        entry = self._destinations.get(key)
        if entry is None:
            return None
        self._refresh(entry, self._clock())
        return entry.last_failure if entry.dead_until is not None else None

    def state(self, key: str) -> DestinationState:
        """The state of ``key`` (a fresh one if it is not tracked)."""
        entry = self._destinations.get(key)
        if entry is None:
            return DestinationState(self.config.initial_window, 0, None, 0, 0)
        self._refresh(entry, self._clock())
        return entry.snapshot()

    def available(self, key: str) -> bool:
        """Whether :meth:`slot` for ``key`` would be granted at once."""
        if self._global_in_use >= self.config.global_concurrency:
            return False
        entry = self._destinations.get(key)
        if entry is None:
            return True
        self._refresh(entry, self._clock())
        return (entry.dead_until is None and entry.in_use < entry.window
                and (self._rate is None or entry.tokens >= 1.0))

    async def _acquire(self, key: str) -> None:
        while True:
            delay = self._try_acquire(key)
            if delay is None:
                return
            entry = self._entry(key)
            entry.waiting += 1
            try:
                await self._wait(delay)
            finally:
                entry.waiting -= 1

    def _try_acquire(self, key: str) -> float | None:
        """Take a slot and return None, or return how long to wait (inf: until a change)."""
        entry = self._entry(key)
        now = self._clock()
        self._refresh(entry, now)
        if entry.dead_until is not None:
            return entry.dead_until - now
        if entry.in_use >= entry.window or self._global_in_use >= self.config.global_concurrency:
            return math.inf
        if self._rate is not None:
            if entry.tokens < 1.0:
                return (1.0 - entry.tokens) / self._rate
            entry.tokens -= 1.0
        entry.in_use += 1
        self._global_in_use += 1
        return None

    async def _wait(self, delay: float) -> None:
        """Wait until any slot state changes or ``delay`` seconds pass."""
        changed = self._changed.wait()
        if math.isinf(delay):
            await changed
            return
        tasks = {asyncio.ensure_future(changed), asyncio.ensure_future(self._sleep(delay))}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    def _release(self, key: str) -> None:
        entry = self._entry(key)
        entry.in_use -= 1
        self._global_in_use -= 1
        self._notify()

    def _notify(self) -> None:
        """Wake every waiter; each re-checks its own destination."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _refresh(self, entry: _Destination, now: float) -> None:
        """Revive a dead destination whose cool-off expired and refill its bucket."""
        if entry.dead_until is not None and now >= entry.dead_until:
            entry.dead_until = None
            entry.window = 1
        if self._rate is not None:
            elapsed = max(0.0, now - entry.stamp)
            entry.tokens = min(self.config.bucket_capacity, entry.tokens + elapsed * self._rate)
        entry.stamp = now

    def _entry(self, key: str) -> _Destination:
        """The entry for ``key``, created (and others evicted) if needed; marks it used."""
        entry = self._destinations.get(key)
        if entry is not None:
            self._destinations.move_to_end(key)
            return entry
        entry = _Destination(self.config.initial_window, self.config.bucket_capacity,
                             self._clock())
        self._destinations[key] = entry
        self._evict(key)
        return entry

    def _evict(self, keep: str) -> None:
        """Forget idle destinations beyond the cap, oldest first, sparing dead ones if possible.

        Destinations with slots held or waiters are never forgotten.
        """
        excess = len(self._destinations) - self.config.max_destinations
        for spare_dead in (True, False):
            victims: list[str] = []
            for key, entry in self._destinations.items():
                if len(victims) >= excess:
                    break
                if key == keep or entry.in_use or entry.waiting:
                    continue
                if spare_dead and entry.dead_until is not None:
                    continue
                victims.append(key)
            for key in victims:
                del self._destinations[key]
            excess -= len(victims)
            if excess <= 0:
                return
