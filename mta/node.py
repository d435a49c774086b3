"""One node process: pool, intake, admission, health and the admin HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web

from mta.admin.http import start_admin
from mta.admin.metrics import Metrics
from mta.admin.scrape import export_scrape_gauges
from mta.config import ProcessRole, Settings
from mta.delivery.deliverer import Deliverer
from mta.delivery.reconcile import reconcile
from mta.delivery.start import start_delivery
from mta.errors import StaleTerm, StoreUnavailable
from mta.intake.admission import Admission
from mta.intake.listener import start_listeners, start_unavailable
from mta.intake.policy import Intake
from mta.node_loops import keep_embedded_alive, refresh_queue_gauges
from mta.queue import EmbeddedPostgres, Store, migrate_dsn
from mta.queue.dedup import DedupStore, DedupUnavailable
from mta.queue.mode_file import ModeKeeper
from mta.queue.pool import SharedPool
from mta.queue.preflight import preflight
from mta.queue.records import NodeModeName
from mta.queue.retention import Retention
from mta.queue.wakeup import Notifier, listen_for_work
from mta.supervision import Supervisor

log = structlog.get_logger(__name__)
#: Seconds between purges of dedup keys past their window.
DEDUP_PURGE_EVERY_S = 300.0

HEALTH_INTERVAL_S = 1.0
#: Seconds before the first retry of a store that did not answer at start, and at most.
STORE_RETRY_FIRST_S = 1.0
STORE_RETRY_MAX_S = 30.0


class Node:
    """Composes one node process. ``start`` it, ``stop`` it, or ``run`` until a signal."""

    def __init__(self, settings: Settings, dsn: str, sockets: Mapping[str, socket.socket],
                 *, reports_queue: bool = True, embedded: EmbeddedPostgres | None = None,
                 role: ProcessRole = "both") -> None:
        """``reports_queue``: this process exports the store-wide queue gauges (one
        process per node does, so that summing over processes counts the queue once).
        ``embedded``: the node's embedded server, which this process restarts when it
        dies (one process per node does). ``role``: whether it takes SMTP, delivers, or
        both (``node.intake_processes``, ``node.delivery_processes``)."""
        self.embedded = embedded
        self.role = role
        self.settings = settings
        self.dsn = dsn
        self.sockets = sockets
        self.reports_queue = reports_queue
        self.metrics = Metrics(settings.node.name)
        self._stats_age = export_scrape_gauges(self.metrics, settings)
        self.store: Store | None = None
        self.intake: Intake | None = None
        self.store_up = False
        self._servers: list[asyncio.Server] = []
        self._admin: web.AppRunner | None = None
        self._stop_background = asyncio.Event()
        self._stop_delivery = asyncio.Event()
        self._loops = Supervisor(self.metrics, self._stop_background)
        self._delivery_loops = Supervisor(self.metrics, self._stop_delivery)
        self.deliverer: Deliverer | None = None
        self._journal_was_up = True
        #: The node's mode: from its store, else its state file, else isolated (I8).
        self._dedup: DedupStore | None = None
        self.modes = ModeKeeper(settings.node.name, Path(settings.node.data_dir),
                                self._apply_mode)
        #: Set by a NOTIFY on the mode channel; the health loop also polls the store.
        self._mode_changed = asyncio.Event()
        self._mode_read_at = 0.0
        #: An external store that cannot be reached at start is waited for (I7).
        self.wait_for_store = bool(settings.database.dsn)
        self._waiting: asyncio.Task[None] | None = None

    @property
    def journal_up(self) -> bool:
        """The delivery journal takes records (true for a node that does not deliver)."""
        return self.deliverer is None or self.deliverer.journal.failed is None

    def status(self) -> dict[str, Any]:
        """What ``/healthz`` and ``/readyz`` report, from memory only."""
        return {
            "node": self.settings.node.name,
            "accepting": self.intake is not None and self.intake.accepting,
            "store_up": self.store_up,
            "journal_up": self.journal_up,
            "sessions": self.intake.session_count if self.intake else 0,
            "failing_tasks": sorted(self._loops.failing | self._delivery_loops.failing),
            "mode": self.modes.mode,
            "role": self.role,
        }

    async def start(self) -> None:
        """Serve admin HTTP, then open the pool and start the loops and the listeners.

        With an external store that cannot be reached, the node does not exit (I7): it
        serves ``/healthz``, ``/metrics`` (``mta_store_up 0``) and ``/readyz`` (503),
        answers SMTP with ``421 4.3.2``, and tries the store again with backoff; once it
        answers, the checks and migrations run and the node starts for real.
        """
        self._admin = await start_admin(self.sockets["admin"], self.metrics, self,
                                        self.settings.admin.tokens(),
                                        self.settings.admin.tls_context())
        self._loops.start("health", self._health_loop)
        if self.embedded is not None:
            embedded, stop = self.embedded, self._stop_background
            self._loops.start("embedded-store",
                              lambda: keep_embedded_alive(embedded, self.metrics, stop))
        try:
            self.store = await self._open_store()
        except StoreUnavailable as exc:
            if not self.wait_for_store:
                raise
            log.warning("node.waiting_for_store", error=str(exc).splitlines()[0])
            if self.role != "delivery":
                self._servers = await start_unavailable(self.sockets)
            self._waiting = asyncio.create_task(self._start_when_store_answers(),
                                                name="waiting-for-store")
            return
        await self._start_serving()

    async def _start_when_store_answers(self) -> None:
        """Retry the store with backoff; then check it, migrate, and start serving."""
        delay = STORE_RETRY_FIRST_S
        while True:
            try:
                await preflight(self.settings, self.dsn, embedded=False)
                await migrate_dsn(self.dsn, self.settings.database.connect_timeout)
                self.store = await self._open_store()
                break
            except StoreUnavailable as exc:
                log.warning("node.store_unreachable", error=str(exc).splitlines()[0],
                            retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_MAX_S)
        for server in self._servers:
            server.close()
        await self._start_serving()

    async def _open_store(self) -> Store:
        """The store, over a pool whose slot waits feed the metrics."""
        pool = await SharedPool.open(self.dsn, self.settings, self.metrics.observe_acquire,
                                     self.role)
        return Store(pool, self.settings)

    async def state(self) -> dict[str, Any]:
        """``GET /v1/state``: the mode, why, by whom, since when, and its term."""
        return await self.modes.state(self.store)

    async def set_state(self, mode: str, reason: str, by: str,
                        term: int | None = None) -> dict[str, Any]:
        """``POST /v1/state``: the mode goes into the store (audited), then applies here
        at once (the node's other processes follow within a second); with the store
        down, here and in the state file at once, and into the store when it answers.
        A controller's change with an older ``term`` than the node accepted: 409."""
        try:
            return await self.modes.set(self.store, cast(NodeModeName, mode), reason, by, term)
        except StaleTerm as exc:
            raise web.HTTPConflict(text=json.dumps({"error": str(exc)}),
                                   content_type="application/json") from exc

    async def queue(self) -> dict[str, Any]:
        """``GET /v1/queue``: deliveries by state and destination, the oldest's age, this
        process's journal backlog (503 without a store)."""
        with self._store_for_admin() as store:
            stats = await store.queue_stats()
            groups = await store.queue_by_destination()
        return {
            "by_state": stats.by_state,
            "by_destination": [{"destination": hop, "state": state, "count": count}
                               for hop, state, count in groups],
            "oldest_pending_s": stats.oldest_message_s,
            "due_lag_s": stats.due_lag_s,
            "expired_leases": stats.expired_leases,
            "delivered_last_minute": stats.delivered_last_minute,
            "journal_backlog": self.deliverer.journal.backlog if self.deliverer else 0,
        }

    async def reconcile(self, by: str, reason: str) -> dict[str, Any]:
        """``POST /v1/reconcile``: start-up's recovery for the node's dead processes (never
        a live one's leases), and what it settled (503 without a store)."""
        with self._store_for_admin() as store:
            report = await reconcile(store, self.settings)
            await store.record_audit("reconcile", by, reason, "ok", report.counts())
        self.metrics.records_set_aside.labels("replay").inc(report.set_aside)
        log.warning("node.reconciled", by=by, reason=reason, **report.counts())
        return report.to_json()

    @contextlib.contextmanager
    def _store_for_admin(self) -> Iterator[Store]:
        """The store for an admin request: 503 with a JSON error while it is unreachable."""
        if self.store is None:
            raise _unreachable("the store is not reachable yet")
        try:
            yield self.store
        except StoreUnavailable as exc:
            raise _unreachable(f"the store is not reachable: {exc}") from exc

    def _apply_mode(self, mode: NodeModeName) -> None:
        """The mode's effect on this process: intake refuses, delivery pauses, metrics."""
        if self.intake is not None:
            self.intake.mode = mode
        if self.deliverer is not None:
            self.deliverer.isolated = mode == "isolated"
        for name in ("active", "draining", "isolated"):
            self.metrics.node_mode.labels(name).set(1 if name == mode else 0)

    async def _start_serving(self) -> None:
        """With the store open: intake, delivery, the background loops and SMTP."""
        assert self.store is not None
        self.store_up = True
        self.metrics.store_up.set(1)
        self.metrics.store_pool_size.set(self.store.pool_size)
        admission = Admission(self.store, self.settings, self.metrics)
        await admission.run_once()
        dedup = self.settings.dedup
        if dedup.enabled and self.role != "delivery":
            self._dedup = await DedupStore.open(
                dedup.database, self.settings.node.name, connections=dedup.connections,
                window_s=dedup.window, timeout_s=dedup.timeout)
        self.intake = Intake(self.settings, self.store, self.metrics, admission, self._dedup)
        if self._dedup is not None:
            self._loops.start("dedup-purge", self._dedup_purge_loop)
        await self.modes.follow(self.store)  # before anything is claimed or accepted (I8)
        retention = Retention(
            self.store, body_after_s=self.settings.retention.body_after,
            metadata_after_s=self.settings.retention.metadata_after,
            audit_after_s=self.settings.retention.audit_after,
            batch=self.settings.retention.batch, interval_s=self.settings.retention.interval)
        stop = self._stop_background
        self._loops.start("admission", lambda: admission.run(stop))
        self._loops.start("retention", lambda: retention.run(stop))
        if self.reports_queue:
            store, stats_age = self.store, self._stats_age
            interval = self.settings.database.queued_bytes_refresh
            self._loops.start("queue-stats", lambda: refresh_queue_gauges(
                store, self.metrics, stats_age, interval, stop))
        else:
            self.metrics.drop_queue_gauges(self._stats_age.gauge)
        notifier = Notifier(self.store, self.settings.node.name)
        self.intake.on_accepted.append(notifier.poke)
        if self.settings.delivery.enabled and self.role != "intake":
            self.deliverer = await start_delivery(self.settings, self.store, self.metrics)
            self._apply_mode(self.modes.mode)
            self.intake.on_accepted.append(self.deliverer.wake.set)
            deliverer = self.deliverer
            self._delivery_loops.start("delivery", lambda: deliverer.run(self._stop_delivery))
        store = self.store
        wake = self.deliverer.wake if self.deliverer is not None else asyncio.Event()
        self._loops.start("listener",
                          lambda: listen_for_work(store, wake, stop, self._mode_changed))
        if self.role != "delivery":
            self._servers = await start_listeners(self.intake, self.settings, self.sockets)
        log.info("node.started", node=self.settings.node.name,
                 listen=self.settings.smtp.listen, pool=self.store.pool_size)

    async def _health_loop(self) -> None:
        while not self._stop_background.is_set():
            self.metrics.heartbeat.set(time.time())
            up = False
            if self.store is not None:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.ping()  # bounded by the acquire and statement timeouts
                    up = True
            if up != self.store_up:
                log.warning("node.store_up" if up else "node.store_down")
            self.store_up = up
            self.metrics.store_up.set(1 if up else 0)
            journal_up = self.journal_up
            if journal_up != self._journal_was_up:
                log.warning("node.journal_up" if journal_up else "node.journal_down")
                self._journal_was_up = journal_up
            self.metrics.journal_up.set(1 if journal_up else 0)
            if self.store is not None:
                self.metrics.store_pool_in_use.set(self.store.pool_in_use)
                hinted = self._mode_changed.is_set()
                self._mode_changed.clear()  # else a hint while the store is down would spin
                due = time.monotonic() >= self._mode_read_at + self.settings.node.mode_poll
                if self.intake is not None and up and (hinted or due):
                    self._mode_read_at = time.monotonic()
                    await self.modes.follow(self.store)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(self._stop_background, self._mode_changed),
                                       HEALTH_INTERVAL_S)

    async def _dedup_purge_loop(self) -> None:
        """Forget dedup keys past their window, a bounded batch every few minutes."""
        assert self._dedup is not None
        while not self._stop_background.is_set():
            with contextlib.suppress(DedupUnavailable):
                await self._dedup.purge()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_background.wait(), DEDUP_PURGE_EVERY_S)

    async def stop(self) -> None:
        """DESIGN.md's shutdown: stop accepting, let DATA in flight commit, close, exit."""
        grace = self.settings.smtp.shutdown_grace
        if self._waiting is not None:
            self._waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._waiting
        for server in self._servers:
            server.close()
        if self.intake is not None:
            self.intake.stop_accepting()
            finished = await self.intake.wait_data_idle(grace)
            if not finished:
                log.warning("node.shutdown_grace_expired", grace_s=grace)
            self.intake.close_sessions()
        await self._stop_deliveries(grace)
        self._stop_background.set()
        for task in self._loops.tasks:
            task.cancel()
        await asyncio.gather(*self._loops.tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.cleanup()
        if self._dedup is not None:
            await self._dedup.close()
        if self.store is not None:
            await self.store.close()
        log.info("node.stopped", node=self.settings.node.name)

    async def _stop_deliveries(self, grace: float) -> None:
        """Let sends in flight finish within ``grace``; the rest keep journal and lease."""
        self._stop_delivery.set()
        tasks = self._delivery_loops.tasks
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.deliverer is not None:
            await self.deliverer.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set, then shut down gracefully."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    """Return once either event is set."""
    waiters = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _unreachable(error: str) -> web.HTTPServiceUnavailable:
    """A 503 whose JSON body names ``error``."""
    return web.HTTPServiceUnavailable(text=json.dumps({"error": error}),
                                      content_type="application/json")
