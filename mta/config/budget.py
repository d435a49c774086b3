"""The connection budget (invariant I6) and the memory bound (invariant I4)."""

from __future__ import annotations

from dataclasses import dataclass

from mta.config.loader import Settings

#: Connections per process that are neither workers nor intake: the NOTIFY
#: listener and admin/maintenance work.
FIXED_CONNECTIONS_PER_PROCESS = 2

#: Copies of one message intake holds while it reads DATA: one. Each chunk is checked
#: and unstuffed as it arrives and appended to the body, and a large body is streamed to
#: the store a slice at a time (mta.queue.message_copy), never copied whole.
INTAKE_COPIES_PER_MESSAGE = 1
#: What a growing body may hold beyond its size: a bytearray over-allocates by 1/8.
INTAKE_GROWTH_SLACK = 1 / 8
#: Per DATA phase, beside the body: the stream's buffer, the chunk read, its unstuffed
#: piece and the slice being handed to the driver (256 KiB each, rounded up).
INTAKE_CHUNK_BYTES = 1024 * 1024

#: Copies of one body a delivery holds: the row as the driver returns it, and the chunk
#: being dot-stuffed onto the socket (bounded, counted as a second copy to be safe).
DELIVERY_COPIES_PER_MESSAGE = 2

#: Interpreter, libraries, pools and per-session buffers, measured (BENCHMARKS.md).
BASE_MEMORY_BYTES = 96 * 1024 * 1024


@dataclass(frozen=True)
class ConnectionBudget:
    """How many database connections a node opens and how many it may open."""

    pool_size: int
    processes: int
    #: Connections each process may open to the fleet database for dedup keys.
    dedup_per_process: int = 0

    @property
    def node_total(self) -> int:
        """Connections this node opens to its store at most, across its processes."""
        return self.pool_size * self.processes

    @property
    def dedup_total(self) -> int:
        """Connections this node opens to the fleet database (dedup) at most."""
        return self.dedup_per_process * self.processes


@dataclass(frozen=True)
class ServerLimits:
    """What the database server allows, read from its settings."""

    max_connections: int
    superuser_reserved: int
    in_use: int

    def available(self, reserve: int) -> int:
        """Connections left for nodes once superusers and the reserve are kept back."""
        return self.max_connections - self.superuser_reserved - reserve


def connection_budget(settings: Settings) -> ConnectionBudget:
    """Derive the pool size from workers and intake slots; it is never set by hand."""
    node = settings.node
    pool = node.workers + node.intake_db_slots + FIXED_CONNECTIONS_PER_PROCESS
    dedup = settings.dedup.connections if settings.dedup.enabled else 0
    return ConnectionBudget(pool_size=pool, processes=node.processes, dedup_per_process=dedup)


def budget_violation(budget: ConnectionBudget, limits: ServerLimits, reserve: int) -> str | None:
    """Return a one-line reason when the budget does not fit the server, else None."""
    available = limits.available(reserve)
    if budget.node_total <= available:
        return None
    return (
        f"connection budget {budget.node_total} "
        f"({budget.processes} process(es) x pool {budget.pool_size}) exceeds "
        f"{available} available (max_connections {limits.max_connections} - "
        f"superuser_reserved_connections {limits.superuser_reserved} - reserve {reserve}); "
        "lower node.workers, node.intake_db_slots or node.processes"
    )


def intake_bytes_per_message(size: int) -> int:
    """What one DATA phase of a message of ``size`` bytes may hold at most."""
    return int(INTAKE_COPIES_PER_MESSAGE * size * (1 + INTAKE_GROWTH_SLACK)) + INTAKE_CHUNK_BYTES


def memory_bound_bytes(settings: Settings) -> int:
    """Upper bound of one node process's memory, from its configuration alone."""
    smtp = settings.smtp
    size = int(smtp.max_message_size)
    intake = smtp.data_concurrency * intake_bytes_per_message(size)
    delivery = (settings.node.workers * DELIVERY_COPIES_PER_MESSAGE * size
                if settings.delivery.enabled else 0)
    return BASE_MEMORY_BYTES + intake + delivery
