"""The connection budget (invariant I6) and the memory bound (invariant I4)."""

from __future__ import annotations

from dataclasses import dataclass

from mta.config.loader import Settings
from mta.config.settings import ProcessRole

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
#: Bodies from this size on are streamed into the store by COPY (mta.queue.message_copy);
#: a smaller one is copied whole into the driver's buffer, a second copy of at most this.
STREAM_BODY_BYTES = 2 * 1024 * 1024

#: Copies of one body a delivery holds: the row as the driver returns it, and the chunk
#: being dot-stuffed onto the socket (bounded, counted as a second copy to be safe).
DELIVERY_COPIES_PER_MESSAGE = 2

#: Interpreter, libraries, pools and per-session buffers, measured (BENCHMARKS.md).
BASE_MEMORY_BYTES = 96 * 1024 * 1024


@dataclass(frozen=True)
class ConnectionBudget:
    """How many database connections a node opens and how many it may open."""

    #: The largest pool of one of its processes.
    pool_size: int
    processes: int
    #: Connections each intake-running process may open to the fleet database (dedup).
    dedup_per_process: int = 0
    #: Each process's pool, by index (empty: every process holds ``pool_size``).
    pools: tuple[int, ...] = ()
    #: Processes that take SMTP (and so may open dedup connections); None: all.
    intake_processes: int | None = None

    @property
    def node_total(self) -> int:
        """Connections this node opens to its store at most, across its processes."""
        return sum(self.pools) if self.pools else self.pool_size * self.processes

    @property
    def dedup_total(self) -> int:
        """Connections this node opens to the fleet database (dedup) at most."""
        takers = self.processes if self.intake_processes is None else self.intake_processes
        return self.dedup_per_process * takers


def role_shares(settings: Settings, role: ProcessRole) -> dict[str, int]:
    """The pool shares of a process of ``role`` (I6): ``workers`` for delivery,
    ``intake_db_slots`` for intake, and the fixed ones, which also serve the odd statement
    of a role the process does not run."""
    shares = {"maintenance": FIXED_CONNECTIONS_PER_PROCESS}
    if role in ("both", "intake"):
        shares["intake"] = settings.node.intake_db_slots
    if role in ("both", "delivery"):
        shares["delivery"] = settings.node.workers
    return shares


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
    roles = settings.node.roles()
    pools = tuple(sum(role_shares(settings, role).values()) for role in roles)
    dedup = settings.dedup.connections if settings.dedup.enabled else 0
    return ConnectionBudget(pool_size=max(pools), processes=len(roles),
                            dedup_per_process=dedup, pools=pools,
                            intake_processes=sum(role != "delivery" for role in roles))


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
    return (int(INTAKE_COPIES_PER_MESSAGE * size * (1 + INTAKE_GROWTH_SLACK))
            + INTAKE_CHUNK_BYTES + min(size, STREAM_BODY_BYTES))


def compresses(size: int, compress_above: int) -> bool:
    """Whether a body of ``size`` bytes is tried for compression (0: never): the rule of
    ``mta.queue.body_codec``, kept here so that the memory bound follows it."""
    return 0 < compress_above <= size < STREAM_BODY_BYTES


def compressed_copy_bytes(settings: Settings) -> int:
    """The compressed copy of a body held beside it while it is stored or read back
    (mta.queue.body_codec): at most the largest body that is tried for compression."""
    largest = min(int(settings.smtp.max_message_size), STREAM_BODY_BYTES - 1)
    return largest if compresses(largest, int(settings.database.compress_bodies_above)) else 0


def memory_bound_bytes(settings: Settings, role: ProcessRole = "both") -> int:
    """Upper bound of the memory of one node process of ``role``, from its configuration
    alone: intake's DATA phases, delivery's bodies being sent, and the base."""
    smtp = settings.smtp
    size = int(smtp.max_message_size)
    packed = compressed_copy_bytes(settings)
    intake = (smtp.data_concurrency * (intake_bytes_per_message(size) + packed)
              if role != "delivery" else 0)
    delivery = (settings.node.workers * (DELIVERY_COPIES_PER_MESSAGE * size + packed)
                if settings.delivery.enabled and role != "intake" else 0)
    return BASE_MEMORY_BYTES + intake + delivery
