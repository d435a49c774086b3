"""Supervised background loops (DESIGN.md I7): a loop that fails is logged, counted and
restarted with backoff; one that keeps failing is named in ``/readyz`` (503) until it
has run a while again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from mta.admin.metrics import Metrics

log = structlog.get_logger(__name__)

#: Seconds before the first restart of a failed loop, and the most between restarts.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: Failures in a row after which a loop counts as failing (``/readyz`` names it).
FAILING_AFTER = 3
#: Seconds a restarted loop must run before its failures are forgiven.
PROBATION_S = 10.0


class Supervisor:
    """Runs a process's background loops; :attr:`failing` names those that keep failing."""

    def __init__(self, metrics: Metrics, stop: asyncio.Event) -> None:
        self._metrics = metrics
        self._stop = stop
        self.failing: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop()`` (which returns once the stop event is set) under supervision."""
        self._metrics.task_failures.labels(name)
        self.tasks.append(asyncio.create_task(self._supervise(name, loop), name=name))

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        failures, backoff = 0, FIRST_BACKOFF_S
        while not self._stop.is_set():
            run = asyncio.ensure_future(loop())
            try:
                try:
                    await asyncio.wait_for(asyncio.shield(run), PROBATION_S)
                except TimeoutError:
                    failures, backoff = 0, FIRST_BACKOFF_S  # it has run long enough again
                    self.failing.discard(name)
                    await run
                return
            except asyncio.CancelledError:
                run.cancel()
                raise
            except Exception as exc:
                failures += 1
                self._metrics.task_failures.labels(name).inc()
                log.error("node.task_failed", task=name, failures=failures,
                          error=repr(exc), exc_info=exc)
                if failures >= FAILING_AFTER:
                    self.failing.add(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
