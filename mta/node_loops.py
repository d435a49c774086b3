"""Background loops of a node process that only read and report: the embedded server's
keeper and the store-wide queue gauges (I7: they keep their last values while the store
is down, and say how old they are)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from mta.admin.metrics import Metrics
from mta.admin.scrape import QueueStatsAge
from mta.errors import StoreUnavailable
from mta.queue import EmbeddedPostgres, Store
from mta.queue.records import PENDING_STATES

log = structlog.get_logger(__name__)

#: Seconds between looks at the embedded server.
EMBEDDED_CHECK_S = 1.0
#: Seconds before the first retry of an embedded server that will not start, and at most.
RESTART_RETRY_FIRST_S = 1.0
RESTART_RETRY_MAX_S = 30.0


async def keep_embedded_alive(server: EmbeddedPostgres, metrics: Metrics,
                              stop: asyncio.Event) -> None:
    """Start the node's embedded server again whenever it is found dead (a crash, an OOM
    kill), with backoff while it will not start; each restart is counted."""
    delay = RESTART_RETRY_FIRST_S
    while not stop.is_set():
        wait = EMBEDDED_CHECK_S
        if server.postmaster_pid() is None:
            log.warning("node.embedded_store_died", data_dir=str(server.base_dir))
            try:
                await asyncio.to_thread(server.start)
            except StoreUnavailable as exc:
                log.warning("node.embedded_store_restart_failed",
                            error=str(exc).splitlines()[0], retry_in_s=delay)
                wait, delay = delay, min(delay * 2, RESTART_RETRY_MAX_S)
            else:
                metrics.embedded_store_restarts.inc()
                log.warning("node.embedded_store_restarted", pid=server.postmaster_pid())
                delay = RESTART_RETRY_FIRST_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)


async def refresh_queue_gauges(store: Store, metrics: Metrics, stats_age: QueueStatsAge,
                               interval: float, stop: asyncio.Event) -> None:
    """Refresh the store-wide ``mta_queue_*`` gauges every ``interval`` seconds."""
    for state in PENDING_STATES:  # every state is exported from the start, as 0
        metrics.queue_deliveries.labels(state)
    while not stop.is_set():
        with contextlib.suppress(StoreUnavailable):
            stats = await store.queue_stats()
            for state, count in stats.by_state.items():
                metrics.queue_deliveries.labels(state).set(count)
            metrics.queue_expired_leases.set(stats.expired_leases)
            metrics.queue_due_lag_seconds.set(stats.due_lag_s)
            metrics.queue_oldest_message_seconds.set(stats.oldest_message_s)
            metrics.queue_rerouted_last_minute.labels("out").set(stats.rerouted_out_last_minute)
            metrics.queue_rerouted_last_minute.labels("in").set(stats.rerouted_in_last_minute)
            stats_age.refreshed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
