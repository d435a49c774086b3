"""``mta serve``: embedded store, preflight, migrations, then one or more node processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import structlog

from mta.allocator import fix_mmap_threshold
from mta.config import Settings, connection_budget
from mta.delivery.reconcile import ReconcileReport, journal_dir, reconcile
from mta.errors import ConfigError, StoreUnavailable
from mta.intake.listener import bind_listeners, process_sockets
from mta.node import Node
from mta.queue import EmbeddedPostgres, EmbeddedServerSettings, Store, migrate_dsn
from mta.queue.preflight import PreflightReport, preflight
from mta.queue.server import schema_behind

log = structlog.get_logger(__name__)

#: Connections kept free on the embedded server beyond the node's budget and reserve.
EMBEDDED_HEADROOM = 10


@dataclass
class Database:
    """The DSN a node uses, and the embedded server behind it if we started one."""

    dsn: str
    embedded: EmbeddedPostgres | None

    def close(self) -> None:
        """Stop the embedded server if this process started it."""
        if self.embedded is not None:
            self.embedded.stop()


def embedded_server(settings: Settings) -> EmbeddedPostgres:
    """The node's embedded server, sized so the connection budget always fits."""
    needed = (connection_budget(settings).node_total + settings.database.connections_reserve
              + 3 + EMBEDDED_HEADROOM)
    return EmbeddedPostgres(
        Path(settings.node.data_dir) / "postgres",
        EmbeddedServerSettings(max_connections=max(100, needed)),
    )


def open_database(settings: Settings, *, adopt: bool = False) -> Database:
    """The configured DSN, or the embedded server in the data directory (started now).

    A server that already runs is stopped at the end only when ``adopt``: ``mta serve``
    owns its node's server, also one a crashed node left running; a CLI command that
    found it running leaves it to the node."""
    if settings.database.dsn:
        return Database(settings.database.dsn, None)
    server = embedded_server(settings)
    was_running = server.postmaster_pid() is not None
    dsn = server.start()
    if was_running and adopt:
        log.info("node.embedded_store_adopted", pid=server.postmaster_pid())
    return Database(dsn, server if adopt or not was_running else None)


async def prepare(settings: Settings, database: Database) -> PreflightReport:
    """Preflight checks, then migrations. Raises on a violation."""
    report = await preflight(settings, database.dsn, embedded=not settings.database.dsn)
    applied = await migrate_dsn(database.dsn, settings.database.connect_timeout)
    if applied:
        log.info("db.migrated", versions=applied)
    return report


async def reconcile_offline(settings: Settings) -> ReconcileReport:
    """Reconcile a node whose daemon is down: open its store as ``mta queue`` does (the
    embedded server too, stopped again if this started it; the schema is checked, never
    migrated) and run its recovery on ``<data_dir>/journal``. Raises ``StoreUnavailable``
    when there is no store, it cannot be reached or its schema is behind, and
    ``ConfigError`` when the data directory holds no journal."""
    directory = journal_dir(settings)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no journal here (is {settings.node.data_dir} "
                          "the node's data_dir?)")
    async with existing_store(settings) as dsn:
        store = await Store.open(dsn, settings)
        try:
            return await reconcile(store, settings)
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def existing_store(settings: Settings) -> AsyncIterator[str]:
    """The DSN of the node's store, opened as ``mta queue`` opens it: the embedded server
    started if it is not running (and stopped again at the end if this started it), the
    schema checked, never created or migrated. ``StoreUnavailable`` when there is no
    store, it cannot be reached, or its schema is behind."""
    if not settings.database.dsn and not embedded_server(settings).initialised():
        raise StoreUnavailable(f"{settings.node.data_dir} holds no embedded store")
    database = await asyncio.to_thread(open_database, settings)
    try:
        behind = await schema_behind(database.dsn, settings.database.connect_timeout)
        if behind:
            raise StoreUnavailable(f"the store lacks migrations {behind}: run "
                                   "'mta db migrate' or 'mta serve' first")
        yield database.dsn
    finally:
        await asyncio.to_thread(database.close)


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("node.exit_now", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("node.stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks, sys.stderr)


def dump_tasks(out: TextIO) -> None:
    """Write every running task's stack to ``out``: what a process that seems stuck waits on.
    The dump goes out in one write, so the dumps of a node's processes do not interleave."""
    tasks = asyncio.all_tasks()
    dump = io.StringIO()
    print(f"--- {len(tasks)} tasks in process {os.getpid()} ---", file=dump)
    for task in tasks:
        print(f"{task!r}", file=dump)
        task.print_stack(limit=12, file=dump)
    out.write(dump.getvalue())
    out.flush()


def run_process(settings: Settings, database: Database, sockets: Mapping[str, socket.socket],
                index: int) -> None:
    """Run one node process's event loop until SIGTERM (uvloop when available). The first
    process keeps the node's embedded server running."""

    fix_mmap_threshold()

    async def main() -> None:
        stop = asyncio.Event()
        _install_signal_handlers(asyncio.get_running_loop(), stop)
        role = settings.node.roles()[index]
        node = Node(settings, database.dsn, process_sockets(sockets, index, role),
                    reports_queue=index == 0,
                    embedded=database.embedded if index == 0 else None, role=role)
        await node.run(stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def serve(settings: Settings) -> int:
    """Start the store, check, migrate, bind, and run ``node.process_count`` processes."""
    database = open_database(settings, adopt=True)
    try:
        try:
            asyncio.run(prepare(settings, database))
        except StoreUnavailable as exc:
            if not settings.database.dsn:
                raise
            # I7: an external store that is down at start is waited for by the node's
            # processes (they check and migrate once it answers), not a reason to exit.
            log.warning("node.store_unreachable_at_start", error=str(exc).splitlines()[0])
        sockets = bind_listeners(settings)
        if settings.node.process_count == 1:
            run_process(settings, database, sockets, 0)
            return 0
        return _run_children(settings, database, sockets)
    finally:
        database.close()


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Get SIGTERM when ``parent`` dies, even by SIGKILL, so no node process is orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run_children(settings: Settings, database: Database,
                  sockets: Mapping[str, socket.socket]) -> int:
    """Fork one child per process; forward SIGTERM/SIGINT/SIGUSR1; stop all if one dies."""
    children: dict[int, int] = {}
    supervisor = os.getpid()
    for index in range(settings.node.process_count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with(supervisor)
                run_process(settings, database, sockets, index)
            except BaseException:
                log.exception("node.process_crashed", index=index)
                code = 1
            os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    status = 0
    while children:
        pid, code = os.wait()
        index = children.pop(pid, -1)
        exit_code = os.waitstatus_to_exitcode(code)
        if exit_code != 0 and index >= 0:
            log.error("node.process_exited", index=index, exit_code=exit_code)
            status = 1
            forward(signal.SIGTERM, None)
    return status

