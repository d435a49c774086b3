"""Prometheus metrics of one node process, held in memory (I7: they outlive the store)."""

from __future__ import annotations

import heapq

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.registry import Collector

from mta import __version__

#: Destinations with a label of their own, at most; the rest are counted as ``other``.
MAX_DESTINATIONS = 20
OTHER_DESTINATION = "other"
#: Attempts a destination needs before it may take a label (one-offs do not).
MIN_LABEL_ATTEMPTS = 3
#: Destinations whose attempts are counted at most; when full, the half with the fewest
#: attempts is forgotten, so a flood of new domains does not grow memory.
MAX_COUNTED_DESTINATIONS = 4096
#: Why a delivery was deferred (``mta_delivery_deferred_total{reason}``).
DEFER_REASONS = ("reply_4xx", "no_reply", "dns", "suspended", "other")
#: Intake refusals with 451 or 452 for the store's sake (MtaIntakeRefusing).
STORE_REFUSALS = ("store_unavailable", "store_full", "data_slots_busy", "internal_error")
#: Seconds, from 1 ms to 10 s, for waits that should be short.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every collector a node exports, in a registry of its own."""

    def __init__(self, node_name: str) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        Info("mta_node", "The node's identity.", registry=reg).info(
            {"node": node_name, "version": __version__}
        )
        self.intake_accepted = Counter(
            "mta_intake_accepted_messages", "Messages committed and answered 250.", registry=reg
        )
        self.intake_accepted_recipients = Counter(
            "mta_intake_accepted_recipients", "Recipients of accepted messages.", registry=reg
        )
        self.intake_accepted_bytes = Counter(
            "mta_intake_accepted_bytes", "Bytes of accepted messages.", registry=reg
        )
        self.intake_rejected = Counter(
            "mta_intake_rejected", "Refused commands and messages, by reason.",
            ["reason"], registry=reg,
        )
        self.intake_sessions = Gauge(
            "mta_intake_sessions", "SMTP sessions open now.", registry=reg
        )
        self.intake_data_in_flight = Gauge(
            "mta_intake_data_in_flight", "DATA phases being read or committed now.", registry=reg
        )
        self.intake_commit_seconds = Histogram(
            "mta_intake_commit_seconds", "Time to commit an accepted message.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=reg,
        )
        self.store_up = Gauge(
            "mta_store_up", "1 when the last store health check succeeded.", registry=reg
        )
        self.embedded_store_restarts = Counter(
            "mta_embedded_store_restarts", "Times the node started its embedded PostgreSQL "
            "again after finding it dead.", registry=reg,
        )
        self.node_mode = Gauge(
            "mta_node_mode", "The node's mode: 1 for the current one (active, draining, "
            "isolated).", ["mode"], registry=reg,
        )
        self.delivery_paused_rounds = Counter(
            "mta_delivery_paused_rounds", "Claim rounds passed over, by reason (isolated).",
            ["reason"], registry=reg,
        )
        self.admin_auth_failures = Counter(
            "mta_admin_auth_failures", "Admin API requests refused: no token, a wrong one, "
            "or none configured.", ["reason"], registry=reg,
        )
        for reason in ("missing", "wrong", "none_configured"):
            self.admin_auth_failures.labels(reason)
        self.task_failures = Counter(
            "mta_task_failures", "Failures of a background loop (restarted with backoff), "
            "by task.", ["task"], registry=reg,
        )
        self.journal_up = Gauge(
            "mta_journal_up", "1 while the delivery journal takes records; 0: it cannot be "
            "written (a full or failing disk) and delivery pauses.", registry=reg
        )
        self.journal_up.set(1)
        self.store_pool_size = Gauge(
            "mta_store_pool_max_connections", "Connections the pool may open (I6).", registry=reg
        )
        self.store_pool_in_use = Gauge(
            "mta_store_pool_connections_in_use", "Connections checked out now.", registry=reg
        )
        self.store_queued_bytes = Gauge(
            "mta_store_queued_bytes", "Bytes of messages with work left (last refresh).",
            registry=reg,
        )
        self.store_free_disk_bytes = Gauge(
            "mta_store_free_disk_bytes", "Free bytes on the data directory's filesystem.",
            registry=reg,
        )
        self.delivery_outcomes = Counter(
            "mta_delivery_outcomes", "Delivery attempts by outcome and destination.",
            ["outcome", "destination"], registry=reg,
        )
        self.delivery_attempt_seconds = Histogram(
            "mta_delivery_attempt_seconds", "Time from routing to the last reply, per attempt.",
            ["destination"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600),
            registry=reg,
        )
        self.delivery_possible_duplicates = Counter(
            "mta_delivery_possible_duplicates",
            "Resends after a lost reply to the dot (uncertain_mode retry), by destination.",
            ["destination"], registry=reg,
        )
        self.records_set_aside = Counter(
            "mta_records_set_aside",
            "Records the store refused, kept for the operator (mta queue set-aside); their "
            "deliveries became uncertain. By source: settlement or replay.",
            ["source"], registry=reg,
        )
        for source in ("settlement", "replay"):
            self.records_set_aside.labels(source)
        self.delivery_timeouts = Counter(
            "mta_delivery_timeouts", "Attempts that ended without a reply, by destination.",
            ["destination"], registry=reg,
        )
        self.queue_deliveries = Gauge(
            "mta_queue_deliveries", "Deliveries with work left, by state (last refresh).",
            ["state"], registry=reg,
        )
        self.queue_expired_leases = Gauge(
            "mta_queue_expired_leases",
            "Leased deliveries past their lease expiry (a stuck or overloaded process).",
            registry=reg,
        )
        self.queue_due_lag_seconds = Gauge(
            "mta_queue_due_lag_seconds",
            "How long the most overdue due delivery has waited past its due time.",
            registry=reg,
        )
        self.queue_oldest_message_seconds = Gauge(
            "mta_queue_oldest_message_age_seconds",
            "Age of the oldest message with work left.", registry=reg,
        )
        self.queue_rerouted_last_minute = Gauge(
            "mta_queue_rerouted_last_minute_deliveries",
            "Deliveries rerouted off this node's store (out) or onto it (in) in the last "
            "60 seconds, by an operator's or the controller's reroute (last refresh).",
            ["direction"], registry=reg,
        )
        for direction in ("out", "in"):
            self.queue_rerouted_last_minute.labels(direction)
        self.heartbeat = Gauge(
            "mta_heartbeat_timestamp_seconds", "Unix time of the event loop's last beat.",
            registry=reg,
        )
        self.dedup_unavailable = Counter(
            "mta_dedup_unavailable", "Submissions accepted without the dedup check, or "
            "whose keys were not recorded, because the key store did not answer in time; "
            "by step (check, record).", ["step"], registry=reg,
        )
        for step in ("check", "record"):
            self.dedup_unavailable.labels(step)
        self.dedup_duplicates = Counter(
            "mta_dedup_duplicate_recipients",
            "Recipients of a repeated submission that were not queued again.", registry=reg,
        )
        self._add_issue12(reg)

    def _add_issue12(self, reg: CollectorRegistry) -> None:
        """Latency, pool waits, heartbeats and the other gauges operators alert on."""
        Gauge("mta_build_info", "Always 1; the version as a label.", ["version"],
              registry=reg).labels(__version__).set(1)
        for reason in STORE_REFUSALS:  # exported from the start, for the alert's rate
            self.intake_rejected.labels(reason)
        self._labelled: set[str] = set()
        self._attempts: dict[str, int] = {}
        self.delivery_accept_to_delivered_seconds = Histogram(
            "mta_delivery_accept_to_delivered_seconds",
            "Time from the 250 at intake to the delivery's success.",
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600,
                     5 * 24 * 3600), registry=reg,
        )
        self.delivery_send_seconds = Histogram(
            "mta_delivery_send_seconds",
            "One SMTP session with the destination: connect to the last reply.",
            ["destination"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600),
            registry=reg,
        )
        self.delivery_deferred = Counter(
            "mta_delivery_deferred", "Deliveries deferred, by reason: reply_4xx, no_reply "
            "(connect failure, timeout, broken session), dns, suspended (the destination "
            "is cooling off), other.", ["reason"], registry=reg,
        )
        for reason in DEFER_REASONS:
            self.delivery_deferred.labels(reason)
        self.delivery_last_success = Gauge(
            "mta_delivery_last_success_timestamp_seconds",
            "Unix time of this process's last successful delivery (0: none yet).",
            registry=reg,
        )
        self.delivery_heartbeat = Gauge(
            "mta_delivery_heartbeat_timestamp_seconds",
            "Unix time of the claim loop's last round (isolated rounds included).",
            registry=reg,
        )
        self.pool_acquire_wait_seconds = Histogram(
            "mta_store_pool_acquire_wait_seconds",
            "Time waiting for a slot of a pool share (intake, delivery, maintenance).",
            ["share"], buckets=WAIT_BUCKETS, registry=reg,
        )
        self.pool_acquire_timeouts = Counter(
            "mta_store_pool_acquire_timeouts", "Waits for a slot of a pool share that "
            "ran past the acquire timeout.", ["share"], registry=reg,
        )
        for share in ("intake", "delivery", "maintenance"):
            self.pool_acquire_wait_seconds.labels(share)
            self.pool_acquire_timeouts.labels(share)

    def destination(self, name: str) -> str:
        """The ``destination`` label of ``name`` now: its own if it was given one, else
        ``other``. Counts nothing; :meth:`attempted` counts and gives labels."""
        return name if name in self._labelled else OTHER_DESTINATION

    def attempted(self, name: str) -> str:
        """Count one attempt to ``name`` and return its label; call it once per attempt.

        The first :data:`MAX_DESTINATIONS` destinations to reach
        :data:`MIN_LABEL_ATTEMPTS` attempts since start get a label of their own, from the
        attempt that reaches it (earlier ones were ``other``), and keep it until restart.
        Every other destination is ``other``, even one that later overtakes a labelled
        one. This is the top :data:`MAX_DESTINATIONS` by attempts counted so far, for
        labels never taken back: while a label is free, every destination counted with more
        attempts than one reaching the minimum reached it earlier and took a label.

        Only destinations without a label are counted, and only while a label is free, in
        a table of at most :data:`MAX_COUNTED_DESTINATIONS`. A new destination that finds
        it full first forgets the half with the fewest attempts (those count again from
        zero): a count never exceeds the attempts since start, and a flood of one-off
        domains costs bounded memory and amortised O(log n) time per attempt."""
        if name in self._labelled or len(self._labelled) >= MAX_DESTINATIONS:
            return self.destination(name)
        attempts = self._attempts.get(name, 0) + 1
        if attempts < MIN_LABEL_ATTEMPTS:
            if attempts == 1 and len(self._attempts) >= MAX_COUNTED_DESTINATIONS:
                self._forget_half()
            self._attempts[name] = attempts
            return OTHER_DESTINATION
        self._attempts.pop(name, None)
        self._labelled.add(name)
        if len(self._labelled) >= MAX_DESTINATIONS:
            self._attempts.clear()  # no label is left to give
        return name

    def _forget_half(self) -> None:
        """Keep the half of the count table with the most attempts; of equal counts, those
        first seen last (an early one-off had more time to come back)."""
        newest_first = reversed(self._attempts.items())
        kept = {name for name, _ in heapq.nlargest(
            MAX_COUNTED_DESTINATIONS // 2, newest_first, key=lambda item: item[1])}
        self._attempts = {name: n for name, n in self._attempts.items() if name in kept}

    def observe_acquire(self, share: str, waited_s: float, timed_out: bool) -> None:
        """A wait for a pool slot of ``share`` ended (the pool's acquire hook)."""
        self.pool_acquire_wait_seconds.labels(share).observe(waited_s)
        if timed_out:
            self.pool_acquire_timeouts.labels(share).inc()

    def drop_queue_gauges(self, *also: Collector) -> None:
        """Stop exporting the store-wide ``mta_queue_*`` gauges, and ``also`` (another
        process of the node reports them, so that summing over processes counts the
        queue once)."""
        for gauge in (self.queue_deliveries, self.queue_expired_leases,
                      self.queue_due_lag_seconds, self.queue_oldest_message_seconds,
                      self.queue_rerouted_last_minute, *also):
            self.registry.unregister(gauge)
