"""``mta fleet controller``: watch every node and drain or isolate a sick one by policy.

Each poll reads every node (``signals.py``) and checks the rules of ``[controller]`` in
fleet.toml: a rule fires for a node once its condition has held for the rule's ``for``.
The controller then acts only when all of these hold: it leads (``leader.py``), it is
not paused, the node is active, the node's cooldown has passed, and fewer than
``max_nodes_out`` nodes are out of ``active`` (whoever took them out), so a fleet-wide
problem never takes every node out. It acts through the admin API or else the store,
with its term; it never reactivates a node and never resends uncertain mail, and it
reroutes only where a rule says ``reroute = true``. Every decision it takes or holds
back is audited with its evidence; ``--dry-run`` audits what it would do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from mta.errors import MtaError, StaleTerm
from mta.fleet.audit import FleetAction, FleetAudit
from mta.fleet.inventory import ControllerRule, Fleet, NodeEntry, Signal
from mta.fleet.leader import Leadership, SharedState
from mta.fleet.modes import COMMAND_MODES, ModeChangeFailed, change_mode
from mta.fleet.reroute import Rerouter, RerouteRefused
from mta.fleet.signals import Sample, figures, poll

log = structlog.get_logger(__name__)


class ControllerMetrics:
    """The controller's own ``/metrics``."""

    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        self.leader = Gauge("mta_controller_leader", "1 while this controller acts.",
                            registry=reg)
        self.term = Gauge("mta_controller_term", "This controller's term while it leads.",
                          registry=reg)
        self.paused = Gauge("mta_controller_paused", "1 while actions are paused.",
                            registry=reg)
        self.decisions = Counter("mta_controller_decisions", "Decisions, by action and "
                                 "outcome (acted, dry_run, paused, max_nodes_out, failed).",
                                 ["action", "outcome"], registry=reg)
        self.last_poll = Gauge("mta_controller_last_poll_timestamp_seconds",
                               "Unix time of the last poll of each node, answered or not.",
                               ["node"], registry=reg)
        self.node_reachable = Gauge("mta_controller_node_reachable",
                                    "1 when the node's admin port answered the last poll.",
                                    ["node"], registry=reg)
        self.nodes_out = Gauge("mta_controller_nodes_out",
                               "Nodes out of active (as last seen).", registry=reg)
        self.rerouted = Counter("mta_controller_rerouted_deliveries", "Deliveries this "
                                "controller's reroutes moved off a node, by source node.",
                                ["node"], registry=reg)


@dataclass(frozen=True)
class Decision:
    """What the controller made of one rule that fired for one node."""

    node: str
    action: str
    #: ``acted``, ``dry_run``, ``paused``, ``max_nodes_out`` or ``failed: …``.
    outcome: str
    evidence: str


class Controller:
    """The watch-and-act loop of one controller process."""

    def __init__(self, fleet: Fleet, data_dir: Path, identity: str, *, dry_run: bool,
                 metrics: ControllerMetrics | None = None) -> None:
        self._fleet = fleet
        self._policy = fleet.controller
        self._data_dir = data_dir
        self.identity = identity
        self.dry_run = dry_run
        self.metrics = metrics or ControllerMetrics()
        self.leadership = (None if dry_run or not fleet.fleet.database
                           else Leadership(fleet.fleet.database, identity))
        self._samples: dict[str, Sample] = {}
        self._modes: dict[str, str] = {}
        #: (node, rule index) -> when its condition started to hold (monotonic).
        self._since: dict[tuple[str, int], float] = {}
        #: (node, rule index) whose held-back decision was already audited.
        self._noted: set[tuple[str, int]] = set()
        self._cooldown_until: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and decide every ``poll_interval`` until ``stop`` is set."""
        try:
            while not stop.is_set():
                await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._policy.poll_interval)
        finally:
            if self.leadership is not None:
                await self.leadership.step_down("stopping")
            for task in list(self._tasks):
                task.cancel()

    async def tick(self) -> list[Decision]:
        """One poll of every node, and the decisions it leads to."""
        shared = await self.leadership.refresh() if self.leadership is not None else None
        term = self.leadership.term if self.leadership is not None else None
        self.metrics.leader.set(1 if term is not None else 0)
        self.metrics.term.set(term or 0)
        self.metrics.paused.set(1 if shared is not None and shared.paused else 0)
        samples = await asyncio.gather(*(poll(node) for node in self._fleet.nodes))
        now = time.monotonic()
        fired: list[tuple[NodeEntry, int, ControllerRule, float]] = []
        for node, sample in zip(self._fleet.nodes, samples, strict=True):
            self.metrics.last_poll.labels(node.name).set(time.time())
            self.metrics.node_reachable.labels(node.name).set(1 if sample.reachable else 0)
            values = figures(self._samples.get(node.name), sample)
            self._samples[node.name] = sample
            if sample.mode is not None:
                self._modes[node.name] = sample.mode
            for index, rule in enumerate(self._policy.rules):
                fired += self._check(node, index, rule, values, now)
        self.metrics.nodes_out.set(self._nodes_out())
        decisions = []
        for node, index, rule, value in fired:
            decision = await self._decide(node, index, rule, value, shared)
            if decision is not None:
                decisions.append(decision)
        return decisions

    def _check(self, node: NodeEntry, index: int, rule: ControllerRule,
               values: dict[Signal, float], now: float
               ) -> list[tuple[NodeEntry, int, ControllerRule, float]]:
        """The rule as fired for ``node`` (its condition held for ``for``), or nothing."""
        key = (node.name, index)
        value = values.get(rule.signal)
        if value is None or not rule.breached(value):
            self._since.pop(key, None)
            self._noted.discard(key)
            return []
        since = self._since.setdefault(key, now)
        return [(node, index, rule, value)] if now - since >= rule.for_ else []

    def _nodes_out(self) -> int:
        return sum(1 for node in self._fleet.nodes
                   if self._modes.get(node.name, "active") != "active")

    async def _decide(self, node: NodeEntry, index: int, rule: ControllerRule, value: float,
                      shared: SharedState | None) -> Decision | None:
        name = node.name
        if self._modes.get(name, "active") != "active":
            return None  # already out: only a person brings it back
        if time.monotonic() < self._cooldown_until.get(name, 0.0):
            return None
        if self.leadership is not None and not self.leadership.leading:
            return None  # another controller acts
        threshold = f"above {rule.above:g}" if rule.above is not None else f"below {rule.below:g}"
        evidence = f"{rule.signal} {value:g} {threshold} for {rule.for_:g} s"
        key = (name, index)
        if shared is not None and shared.paused:
            return await self._held_back(key, node, rule, "paused", evidence)
        if self._nodes_out() >= self._policy.max_nodes_out:
            return await self._held_back(key, node, rule, "max_nodes_out", evidence)
        if self.dry_run:
            self._cooldown_until[name] = time.monotonic() + self._policy.cooldown
            return await self._record(node, rule, "dry_run", evidence)
        term = self.leadership.term if self.leadership is not None else None
        try:
            change = await change_mode(node, COMMAND_MODES[rule.action],
                                       f"controller: {evidence}", self._operator(term), term)
        except (ModeChangeFailed, StaleTerm) as exc:
            if isinstance(exc, StaleTerm) and self.leadership is not None:
                await self.leadership.step_down(str(exc))
            return await self._record(node, rule, f"failed: {exc}", evidence)
        self._modes[name] = change.mode
        self._cooldown_until[name] = time.monotonic() + self._policy.cooldown
        if rule.reroute:
            self._spawn(self._reroute(node))
        return await self._record(node, rule, f"acted via {change.via}", evidence)

    async def _held_back(self, key: tuple[str, int], node: NodeEntry, rule: ControllerRule,
                         why: str, evidence: str) -> Decision | None:
        """A decision it may not carry out: logged every time, audited once per episode."""
        log.warning("controller.held_back", node=node.name, action=rule.action, why=why,
                    evidence=evidence)
        if key in self._noted:
            return None
        self._noted.add(key)
        return await self._record(node, rule, why, evidence)

    async def _record(self, node: NodeEntry, rule: ControllerRule, outcome: str,
                      evidence: str) -> Decision:
        term = self.leadership.term if self.leadership is not None else None
        self.metrics.decisions.labels(rule.action, outcome.split(" ")[0].rstrip(":")).inc()
        log.warning("controller.decision", node=node.name, action=rule.action,
                    outcome=outcome, evidence=evidence, term=term)
        async with FleetAudit.opened(self._fleet, self._data_dir) as audit:
            await audit.record(FleetAction(f"controller:{rule.action}", node.name,
                                           self._operator(term), evidence, outcome,
                                           {"term": term or 0}))
        return Decision(node.name, rule.action, outcome, evidence)

    def _operator(self, term: int | None) -> str:
        suffix = f" term {term}" if term is not None else " (dry run)" if self.dry_run else ""
        return f"controller {self.identity}{suffix}"

    async def _reroute(self, node: NodeEntry) -> None:
        """Move the node's pending mail, as a rule with ``reroute = true`` asks."""
        try:
            report = await Rerouter(self._fleet, node.name, [],
                                    operator=self._operator(self.leadership.term
                                                            if self.leadership else None),
                                    reason="controller: a rule with reroute = true").run()
        except (RerouteRefused, MtaError) as exc:  # logged; the controller goes on
            log.error("controller.reroute_failed", node=node.name, error=str(exc))
            return
        self.metrics.rerouted.labels(node.name).inc(report.moved_total)
        log.warning("controller.rerouted", node=node.name, moved=report.moved_total,
                    skipped=report.skipped)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)



async def serve_metrics(metrics: ControllerMetrics, host: str, port: int) -> web.AppRunner:
    """Serve the controller's ``/metrics`` and ``/healthz`` on ``host:port``."""
    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
