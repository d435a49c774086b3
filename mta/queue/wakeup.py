"""Wake delivery workers when mail arrives: NOTIFY is the hint, polling the guarantee."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from mta.errors import StoreUnavailable
from mta.queue.store import Store

log = structlog.get_logger(__name__)

#: Seconds between checks that the listening connection is still open.
LISTENER_CHECK_S = 2.0
#: Under load, at most one NOTIFY per this many seconds (workers poll meanwhile anyway).
NOTIFY_MIN_INTERVAL_S = 0.05


class Notifier:
    """Sends at most one NOTIFY at a time for a burst of accepted messages."""

    def __init__(self, store: Store, source: str) -> None:
        self._store = store
        self._source = source
        self._pending: asyncio.Task[None] | None = None
        self._again = False

    def poke(self) -> None:
        """Note new work; a NOTIFY follows soon (never one per message under load)."""
        if self._pending is not None and not self._pending.done():
            self._again = True
            return
        self._pending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while True:
            self._again = False
            with contextlib.suppress(StoreUnavailable):
                await self._store.notify_new_work(self._source)
            if not self._again:
                return
            await asyncio.sleep(NOTIFY_MIN_INTERVAL_S)


async def listen_for_work(store: Store, wake: asyncio.Event, stop: asyncio.Event,
                          mode_changed: asyncio.Event) -> None:
    """Set ``wake`` on every new-work NOTIFY and ``mode_changed`` on every mode change;
    listen again whenever the connection is lost."""
    while not stop.is_set():
        try:
            async with store.listening(wake.set, mode_changed.set) as is_open:
                wake.set()  # work may have arrived while nobody listened
                mode_changed.set()  # and the mode may have changed
                while is_open() and not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), LISTENER_CHECK_S)
        except StoreUnavailable as exc:
            log.warning("delivery.listener_unavailable", error=str(exc))
        except Exception:
            # A bug must not end listening for good: workers would wait for the poll.
            log.exception("delivery.listener_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), LISTENER_CHECK_S)
