"""What the controller watches: one poll of a node's admin port, and the named figures
(``Signal``) that two polls in a row give.

A poll reads ``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/queue``. Counters become
rates between two polls (a node that restarted, whose counters went down, counts from
zero). Every figure is a plain number, so rules compare them alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from mta.fleet.admin_client import AdminClient, AdminRefused, AdminUnreachable
from mta.fleet.inventory import NodeEntry, Signal

#: Intake refusals answered ``451`` (the node cannot take mail now).
TEMP_REFUSALS = frozenset({"store_unavailable", "data_slots_busy", "internal_error"})


@dataclass
class Sample:
    """One poll of one node."""

    at: float
    reachable: bool
    ready: bool = False
    store_up: bool = False
    mode: str | None = None
    heartbeat_age_s: float = 0.0
    oldest_pending_s: float = 0.0
    #: Cumulative counters: attempts, timeouts, 451 refusals, and attempts per bucket.
    attempts: float = 0.0
    timeouts: float = 0.0
    refused_451: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    error: str = ""


async def poll(node: NodeEntry, timeout_s: float = 3.0) -> Sample:
    """Read ``node``'s admin port once; an unreachable node is a sample saying so."""
    client = AdminClient(node, timeout_s)
    now = time.monotonic()
    try:
        _, health = await client.get("/healthz")
        ready_status, _ = await client.get("/readyz")
        metrics = await client.text("/metrics")
    except (AdminUnreachable, AdminRefused) as exc:
        return Sample(now, reachable=False, error=str(exc))
    sample = Sample(now, reachable=True, ready=ready_status == 200,
                    store_up=bool(isinstance(health, dict) and health.get("store_up")),
                    mode=health.get("mode") if isinstance(health, dict) else None)
    _read_metrics(sample, metrics)
    try:
        queue = await client.call("GET", "/v1/queue")
        sample.oldest_pending_s = float(queue.get("oldest_pending_s") or 0.0)
    except (AdminUnreachable, AdminRefused, AttributeError, TypeError, ValueError) as exc:
        sample.error = f"/v1/queue: {exc}"
    return sample


def _read_metrics(sample: Sample, text: str) -> None:
    wall = time.time()
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            name, labels, value = metric.name, metric.labels, metric.value
            if name == "mta_heartbeat_timestamp_seconds":
                sample.heartbeat_age_s = max(0.0, wall - value)
            elif name == "mta_delivery_attempt_seconds_bucket":
                bound = float(labels["le"])
                sample.buckets[bound] = sample.buckets.get(bound, 0.0) + value
            elif name == "mta_delivery_attempt_seconds_count":
                sample.attempts += value
            elif name == "mta_delivery_timeouts_total":
                sample.timeouts += value
            elif (name == "mta_intake_rejected_total"
                  and labels.get("reason") in TEMP_REFUSALS):
                sample.refused_451 += value


def figures(previous: Sample | None, current: Sample) -> dict[Signal, float]:
    """The named figures of ``current`` (rates since ``previous``, when there is one)."""
    if not current.reachable:
        return {"unreachable": 1.0}
    out: dict[Signal, float] = {
        "unreachable": 0.0, "store_down": 0.0 if current.store_up else 1.0,
        "not_ready": 0.0 if current.ready else 1.0,
        "heartbeat_age_s": current.heartbeat_age_s,
        "oldest_pending_s": current.oldest_pending_s,
        "attempt_p95_s": 0.0, "timeout_ratio": 0.0, "intake_451_per_s": 0.0,
    }
    if previous is None or not previous.reachable:
        return out
    attempts = _delta(current.attempts, previous.attempts)
    if attempts > 0:
        out["timeout_ratio"] = min(1.0, _delta(current.timeouts, previous.timeouts) / attempts)
        out["attempt_p95_s"] = _p95({bound: _delta(n, previous.buckets.get(bound, 0.0))
                                     for bound, n in current.buckets.items()}, attempts)
    elapsed = current.at - previous.at
    if elapsed > 0:
        out["intake_451_per_s"] = _delta(current.refused_451, previous.refused_451) / elapsed
    return out


def _delta(now: float, before: float) -> float:
    """A counter's growth; a counter that went down (the node restarted) counts from 0."""
    return now - before if now >= before else now


def _p95(buckets: dict[float, float], total: float) -> float:
    """The upper bound of the bucket that holds the 95th percentile of ``total``
    attempts (the last finite bound when it is past every bucket)."""
    wanted = 0.95 * total
    finite = sorted(b for b in buckets if not math.isinf(b))
    for bound in finite:
        if buckets[bound] >= wanted:
            return bound
    return finite[-1] if finite else 0.0
