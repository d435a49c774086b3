"""``mta fleet reroute``: move a draining or isolated node's pending mail to active nodes.

A handoff with receipts (DESIGN.md): each batch is leased in the source's store to the
run (``reroute:<run id>``, each delivery with the target its message goes to), copied
into the target under a unique key on its origin, then marked ``rerouted`` with the
copy's id. A run holds the source's reroute lock, so the handoffs it finds from other
runs are a dead run's: it finishes them first, to the target each was leased for. The
source's daemon may be running (its workers and the run never take the same row) or
down (only the source's store is read).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mta.errors import StoreUnavailable
from mta.faults import fault_point
from mta.fleet.admin_client import AdminClient, AdminUnreachable
from mta.fleet.inventory import Fleet, NodeEntry
from mta.fleet.stores import NodeStore, open_node_store
from mta.queue.handoff import HandedDelivery, HandoffSource, HandoffTarget, ReroutedElsewhere

#: Seconds a run's lease on a handoff lasts (a later run takes over a dead run's at once).
LEASE_S = 3600.0
#: Bytes of bodies one copy statement carries at most (at least one message).
CHUNK_BYTES = 16 * 1024 * 1024
#: Seconds between re-reads of a target's queued bytes against its admission limit.
ADMISSION_RECHECK_S = 5.0


class RerouteRefused(Exception):
    """The run cannot start: an active source, no usable target, or another run."""


@dataclass
class RerouteReport:
    """What one run did and what it left."""

    run: str
    source: str
    #: Deliveries copied to each target by this run.
    moved: dict[str, int] = field(default_factory=dict)
    #: Deliveries whose copy an earlier (dead) run had made: only the receipt was missing.
    already_moved: int = 0
    #: What stays on the source, by state (``in_handoff``: waiting for a target).
    skipped: dict[str, int] = field(default_factory=dict)
    #: Targets not used (or no longer used) by this run, and why.
    targets_skipped: dict[str, str] = field(default_factory=dict)
    #: ``--dry-run``: (next hop, state, deliveries) that would move, and to which nodes.
    plan: list[tuple[str, str, int]] = field(default_factory=list)
    plan_targets: list[str] = field(default_factory=list)

    @property
    def moved_total(self) -> int:
        """Deliveries this run copied."""
        return sum(self.moved.values())

    @property
    def result(self) -> str:
        """``partial`` while handoffs wait for a target, else ``ok`` (for the audit)."""
        return "partial" if self.skipped.get("in_handoff") else "ok"

    def counts(self) -> dict[str, int]:
        """What the audit keeps of the run."""
        return {"moved": self.moved_total, "already_moved": self.already_moved,
                **{f"moved_to_{name}": n for name, n in self.moved.items()},
                **{f"skipped_{state}": n for state, n in self.skipped.items()}}


Progress = Callable[[int, int], None]


@dataclass
class _Target:
    """A target store open for the run, and its admission headroom."""

    node: NodeEntry
    opened: NodeStore
    handoff: HandoffTarget
    max_queued_bytes: int
    queued_bytes: int = 0
    checked_at: float = 0.0


class Rerouter:
    """One reroute run from ``source`` to ``targets``."""

    def __init__(self, fleet: Fleet, source: str, targets: Sequence[str], *, batch: int = 500,
                 rate: float | None = None, progress: Progress | None = None,
                 operator: str = "reroute", reason: str = "") -> None:
        self._fleet = fleet
        self._source = fleet.node(source)
        names = list(dict.fromkeys(targets)) or [n.name for n in fleet.nodes
                                                  if n.name != source]
        if source in names:
            raise RerouteRefused(f"{source} cannot be its own target")
        self._target_nodes = [fleet.node(name) for name in names]
        self._batch = batch
        self._rate = rate
        self._progress = progress or (lambda done, total: None)
        run = uuid.uuid4().hex[:12]
        self.owner = f"reroute:{run}"
        self.report = RerouteReport(run, source)
        self._targets: dict[str, _Target] = {}
        #: Targets new handoffs may go to, until one fails or fills up.
        self._usable: list[str] = []
        #: Targets a copy failed on in this run: nothing more goes there.
        self._failed: set[str] = set()
        self._stack = contextlib.AsyncExitStack()
        self._done = 0
        self._total = 0
        self._operator = operator
        self._reason = reason or f"move pending mail off {source}"

    async def run(self, *, dry_run: bool = False) -> RerouteReport:
        """Move everything pending that can move (``dry_run``: only say what would)."""
        async with self._stack:
            source = await self._stack.enter_async_context(open_node_store(self._source))
            mode = await source.store.node_mode(self._source.name)
            if mode is None or mode.mode == "active":
                raise RerouteRefused(
                    f"{self._source.name} is active: reroute moves mail off a draining or "
                    f"isolated node (run 'mta fleet drain {self._source.name}' or isolate)")
            for node in self._target_nodes:
                await self._open_target(node, check=True)
            stats = await source.store.queue_stats()
            self._total = stats.by_state["queued"] + stats.by_state["deferred"]
            if dry_run:
                return await self._plan(source)
            if not self._usable:
                raise RerouteRefused("no usable target: " + "; ".join(
                    f"{name}: {why}" for name, why in self.report.targets_skipped.items()))
            try:
                async with HandoffSource.locked(source.pool, self._source.name, self.owner,
                                                source.settings.database.commit_timeout
                                                ) as handoff:
                    await self._finish_dead_runs(handoff)
                    await self._move(handoff)
                    left = await handoff.left_behind()
            except ReroutedElsewhere as exc:
                raise RerouteRefused(str(exc)) from None
            self.report.skipped = {"leased": left.leased, "uncertain": left.uncertain,
                                   "held": left.held, "in_handoff": left.in_handoff}
            # In the source node's own audit table, on the store the run already holds.
            await source.store.record_audit("reroute", self._operator, self._reason,
                                            self.report.result, self.report.counts())
            return self.report

    async def _plan(self, source: NodeStore) -> RerouteReport:
        groups = await source.store.queue_by_destination(limit=1000)
        self.report.plan = [g for g in groups if g[1] in ("queued", "deferred")]
        self.report.plan_targets = list(self._usable)
        return self.report

    async def _open_target(self, node: NodeEntry, *, check: bool) -> _Target | None:
        """Open ``node``'s store for copies (None, with the reason in the report, when it
        cannot be reached). With ``check``, it takes new handoffs only when it is active,
        ready and under its admission limit; a dead run's handoffs go to their target
        whatever its mode (a copy may be there already)."""
        if node.name not in self._targets:
            try:
                opened = await self._stack.enter_async_context(open_node_store(node))
            except StoreUnavailable as exc:
                self.report.targets_skipped[node.name] = str(exc).splitlines()[0]
                return None
            limit = int(opened.settings.admission.max_queued_bytes) if node.config else 0
            self._targets[node.name] = _Target(node, opened, HandoffTarget(
                opened.pool, opened.settings.database.commit_timeout), limit)
        target = self._targets[node.name]
        if check:
            why = await _unusable(node, target.opened)
            if why is None:
                self._usable.append(node.name)
            else:
                self.report.targets_skipped[node.name] = why
        return target

    async def _finish_dead_runs(self, handoff: HandoffSource) -> None:
        """Give dead runs' handoffs their copies (found or made) and receipts."""
        for _ in range(1_000_000):
            adopted = await handoff.adopt(self._batch, LEASE_S)
            if not adopted:
                return
            await self._hand(handoff, adopted, fresh=False)

    async def _move(self, handoff: HandoffSource) -> None:
        started = time.monotonic()
        for _ in range(1_000_000):
            if not self._usable:
                return
            leased = await handoff.lease(self._batch, LEASE_S, self._usable)
            if not leased:
                return
            await self._hand(handoff, leased, fresh=True)
            if self._rate:
                ahead = self.report.moved_total / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)  # pacing (--rate), not synchronisation

    async def _hand(self, handoff: HandoffSource, deliveries: Sequence[HandedDelivery], *,
                    fresh: bool) -> None:
        """Copy ``deliveries`` to their targets and write the receipts, chunk by chunk.
        A target that fails keeps its chunk in handoff (a later run finishes it); what
        was never offered to it goes back to the queue when ``fresh``."""
        by_target: dict[str, list[HandedDelivery]] = defaultdict(list)
        for delivery in deliveries:
            by_target[delivery.target].append(delivery)
        for name, group in by_target.items():
            target = self._targets.get(name)
            if target is None and not fresh and name in {n.name for n in self._fleet.nodes}:
                target = await self._open_target(self._fleet.node(name), check=False)
            chunks = _chunks(group)
            for index, chunk in enumerate(chunks):
                usable = target is not None and name not in self._failed and (
                    not fresh or (name in self._usable and await self._admits(target, chunk)))
                if not usable:
                    if fresh:
                        await handoff.release([d.id for c in chunks[index:] for d in c])
                    break
                assert target is not None
                await self._copy(handoff, target, chunk)

    async def _admits(self, target: _Target, chunk: Sequence[HandedDelivery]) -> bool:
        """Whether ``target`` stays under its admission limit with ``chunk``; a target at
        its limit is skipped for the rest of the run."""
        if not target.max_queued_bytes:
            return True
        now = time.monotonic()
        if now - target.checked_at >= ADMISSION_RECHECK_S:
            target.queued_bytes = await target.opened.store.queued_bytes()
            target.checked_at = now
        incoming = sum({d.message_id: d.size_bytes for d in chunk}.values())
        if target.queued_bytes + incoming <= target.max_queued_bytes:
            target.queued_bytes += incoming
            return True
        self._usable.remove(target.node.name)
        self.report.targets_skipped[target.node.name] = (
            f"at its admission limit (queued {target.queued_bytes} bytes, "
            f"max_queued_bytes {target.max_queued_bytes})")
        return False

    async def _copy(self, handoff: HandoffSource, target: _Target,
                    chunk: Sequence[HandedDelivery]) -> None:
        name = target.node.name
        message_ids = list(dict.fromkeys(d.message_id for d in chunk))
        copies = await handoff.contents(message_ids)
        try:
            found, added = await target.handoff.insert(self._source.name, self.owner, copies,
                                                       chunk)
        except StoreUnavailable as exc:
            self._failed.add(name)
            if name in self._usable:
                self._usable.remove(name)
            self.report.targets_skipped[name] = f"copy failed: {str(exc).splitlines()[0]}"
            return
        fault_point("reroute.after_target_insert")
        receipted = await handoff.receipt([(d.id, found[d.message_id]) for d in chunk
                                           if d.message_id in found])
        self.report.moved[name] = self.report.moved.get(name, 0) + added
        self.report.already_moved += max(0, len(receipted) - added)
        self._done += len(receipted)
        self._progress(self._done, max(self._total, self._done))


def _chunks(group: Sequence[HandedDelivery]) -> list[list[HandedDelivery]]:
    """``group`` split so each chunk's distinct messages carry at most ``CHUNK_BYTES``
    (a message's deliveries stay together; a larger message is a chunk alone)."""
    by_message: dict[uuid.UUID, list[HandedDelivery]] = defaultdict(list)
    for delivery in group:
        by_message[delivery.message_id].append(delivery)
    chunks: list[list[HandedDelivery]] = [[]]
    size = 0
    for deliveries in by_message.values():
        message_size = deliveries[0].size_bytes
        if chunks[-1] and size + message_size > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].extend(deliveries)
        size += message_size
    return [chunk for chunk in chunks if chunk]


async def _unusable(node: NodeEntry, opened: NodeStore) -> str | None:
    """Why ``node`` cannot take copies now, or None: it must be active in its store and
    ready on its admin API (so its daemon will deliver what it gets)."""
    mode = await opened.store.node_mode(node.name)
    if mode is not None and mode.mode != "active":
        return f"{mode.mode} ({mode.reason})"
    try:
        status, answer = await AdminClient(node).get("/readyz")
    except AdminUnreachable as exc:
        return f"admin API unreachable: {exc}"
    if status != 200:
        failing = answer.get("failing_tasks") if isinstance(answer, dict) else None
        return f"not ready (/readyz {status}{f', failing {failing}' if failing else ''})"
    return None
