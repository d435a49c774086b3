"""The fleet's audit log (DESIGN.md, Audit; I9): the fleet database, or a local spool.

Fleet actions are recorded in the table ``fleet_audit`` of the schema ``mta_fleet`` in
``fleet.database``, or, when that is not set, in an embedded PostgreSQL in
``<data_dir>/store`` (one operator's host). An emergency action never waits for the
audit: when the database cannot be reached, the record is appended to
``<data_dir>/audit-spool.jsonl`` (fsynced), and the next :meth:`FleetAudit.opened` that
reaches the database copies the spool in (a record is stored once, by its ``record_id``)
before it truncates it. A spool line that cannot be read or stored is moved to
``audit-spool.rejected.jsonl`` and never blocks the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from mta.errors import ConfigError, MtaError
from mta.fleet.inventory import Fleet
from mta.fleet.spool_files import SpoolError, append_lines, open_locked, spool_io
from mta.mail.text import outside_text
from mta.queue import EmbeddedPostgres
from mta.queue.migrate import migrate
from mta.queue.records import AuditRecord
from mta.queue.server import REJECTED_ERRORS, STORE_ERRORS
from mta.queue.sql import parse_queries

log = structlog.get_logger(__name__)

#: The Postgres schema of every fleet table; connections use it as their search path.
SCHEMA = "mta_fleet"
#: The package whose ``migrations`` folder holds the fleet schema.
FLEET_PACKAGE = "mta.fleet"
SPOOL_NAME = "audit-spool.jsonl"
REJECTED_NAME = "audit-spool.rejected.jsonl"
#: Where the local fleet store lives in ``--data-dir`` when ``fleet.database`` is not set.
STORE_DIR = "store"
#: An emergency action waits at most this long for the fleet database.
CONNECT_TIMEOUT_S = 3.0
COMMAND_TIMEOUT_S = 10.0
#: Errors that mean the fleet database (or its embedded server) is not there.
_UNREACHABLE: tuple[type[BaseException], ...] = (*STORE_ERRORS, MtaError,
                                                subprocess.SubprocessError)
#: Names node audit records in the ``record_id`` space (they have integer ids).
_NODE_RECORDS = uuid.UUID("6f1d1c52-4b8e-4a59-9d0b-7c3f4c8a2e10")


@cache
def _queries() -> dict[str, str]:
    text = resources.files(FLEET_PACKAGE).joinpath("queries.sql").read_text(encoding="utf-8")
    return parse_queries(text)


def fleet_query(name: str) -> str:
    """One statement of ``mta/fleet/queries.sql`` by name."""
    return _queries()[name]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class FleetAction:
    """One fleet action: what, on which node, by whom, why, how it ended, what it counted."""

    action: str
    node: str
    operator: str
    reason: str
    #: ``ok``, ``partial`` or ``failed: <why>``.
    result: str
    counts: Mapping[str, int] = field(default_factory=dict)
    record_id: uuid.UUID = field(default_factory=uuid.uuid4)
    at: datetime = field(default_factory=_now)

    def as_json(self) -> dict[str, Any]:
        """A JSON object (the spool's line, and ``mta fleet audit --json``)."""
        return {"at": self.at.isoformat(), "node": self.node, "action": self.action,
                "operator": self.operator, "reason": self.reason, "result": self.result,
                "counts": dict(self.counts), "record_id": str(self.record_id)}

    @classmethod
    def from_json(cls, values: Any) -> FleetAction:
        """Read :meth:`as_json`'s object back; ``ValueError`` when it is not one."""
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        texts = {}
        for key in ("action", "node", "operator", "reason", "result"):
            if not isinstance(values.get(key), str):
                raise ValueError(f"{key}: expected a string")
            texts[key] = values[key]
        counts = values.get("counts", {})
        if not isinstance(counts, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
            raise ValueError("counts: expected an object of integers")
        at = datetime.fromisoformat(str(values.get("at")))
        if at.tzinfo is None:
            raise ValueError("at: no time zone")
        return cls(**texts, counts=counts, record_id=uuid.UUID(str(values.get("record_id"))),
                   at=at)

    def row(self) -> tuple[Any, ...]:
        """The values of ``fleet_audit_insert``, text made safe (DESIGN.md I3b)."""
        return (self.at, outside_text(self.node), outside_text(self.operator),
                outside_text(self.action), outside_text(self.reason), outside_text(self.result),
                json.dumps(dict(self.counts)), self.record_id)


@dataclass(frozen=True)
class AuditEntry:
    """A record as ``mta fleet audit`` lists it, and where it was read."""

    #: ``fleet`` (the fleet database), ``spool`` (waiting to be copied) or ``node``; a
    #: fleet record the node's audit table also holds is ``fleet+node`` or ``spool+node``.
    source: str
    record: FleetAction


def from_node_record(record: AuditRecord) -> FleetAction:
    """A node's own audit record in the fleet's shape (its id named by a stable uuid)."""
    return FleetAction(record.action, record.node, record.operator, record.reason,
                       record.result, dict(record.counts),
                       uuid.uuid5(_NODE_RECORDS, f"{record.node}/{record.id}"), record.at)


def requires_shared_database(fleet: Fleet, what: str) -> None:
    """Refuse ``what`` (the controller, de-duplication) on a fleet without a shared database."""
    if not fleet.fleet.database:
        raise ConfigError(f"{what} needs fleet.database (a shared Postgres), not the local "
                          "store in --data-dir: set database in the [fleet] table of fleet.toml")


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AuditSpool:
    """``<data_dir>/audit-spool.jsonl``: records the fleet database has not taken yet."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / SPOOL_NAME
        self.rejected_path = data_dir / REJECTED_NAME

    def append(self, action: FleetAction) -> None:
        """Add one record as one line, on disk (fsynced) before this returns."""
        append_lines(self.path, [json.dumps(action.as_json()) + "\n"])

    def pending(self) -> list[FleetAction]:
        """The records waiting (unreadable lines skipped)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("fleet.audit_spool_unusable", error=f"{self.path}: {exc.strerror}")
            return []
        found = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                found.append(FleetAction.from_json(json.loads(line)))
        return found

    async def copy_into(self, conn: asyncpg.Connection) -> int:
        """Insert every spooled record, commit, set bad lines aside, then truncate (a
        crash before the truncation copies the same records again, which stores nothing
        new). Returns how many records were new to the database."""
        with spool_io(self.path):
            if not self.path.exists():
                return 0
            fd = open_locked(self.path, os.O_RDWR)
        try:
            with spool_io(self.path):
                raw = os.pread(fd, os.fstat(fd).st_size, 0)
            if not raw:
                return 0
            copied, rejected = await _insert_lines(conn, raw)
            if rejected:
                with spool_io(self.rejected_path):
                    append_lines(self.rejected_path, rejected)
                log.warning("fleet.audit_spool_rejected", lines=len(rejected),
                            path=str(self.rejected_path))
            with spool_io(self.path):
                os.ftruncate(fd, 0)
                os.fsync(fd)
            return copied
        finally:
            os.close(fd)


async def _insert_lines(conn: asyncpg.Connection, raw: bytes) -> tuple[int, list[str]]:
    """Insert the spool's lines in one transaction; returns how many were new, and the
    lines that could not be read or stored (with why), each to be set aside."""
    rejected: list[str] = []
    copied = 0
    async with conn.transaction():
        for line in raw.decode("utf-8", "surrogateescape").splitlines():
            if not line.strip():
                continue
            try:
                action = FleetAction.from_json(json.loads(line))
            except ValueError as exc:
                rejected.append(_rejected_line(line, f"unreadable: {_why(exc)}"))
                continue
            try:
                async with conn.transaction():
                    status = await conn.execute(fleet_query("fleet_audit_insert"),
                                                *action.row())
            except REJECTED_ERRORS as exc:
                rejected.append(_rejected_line(line, f"refused: {_why(exc)}"))
                continue
            copied += status == "INSERT 0 1"
    return copied, rejected


def _rejected_line(line: str, why: str) -> str:
    return json.dumps({"rejected": outside_text(why), "line": outside_text(line)}) + "\n"


async def connect_fleet_database(dsn: str,
                                 settings: Mapping[str, str] | None = None
                                 ) -> asyncpg.Connection:
    """A connection to the fleet database whose search path is the fleet schema, which
    is created and migrated here (``settings``: more server settings for the session)."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S,
                                 command_timeout=COMMAND_TIMEOUT_S,
                                 server_settings={"search_path": SCHEMA, **(settings or {})})
    try:
        async with conn.transaction():
            await conn.execute(fleet_query("fleet_schema_lock"))
            await conn.execute(fleet_query("fleet_schema_create"))
        await migrate(conn, FLEET_PACKAGE)
    except BaseException:
        await conn.close(timeout=CONNECT_TIMEOUT_S)
        raise
    return conn


class FleetAudit:
    """The fleet audit as one fleet command holds it (see :meth:`opened`)."""

    def __init__(self, spool: AuditSpool, conn: asyncpg.Connection | None,
                 why: str | None) -> None:
        self._spool = spool
        self._conn = conn
        self._why = why

    @classmethod
    @asynccontextmanager
    async def opened(cls, fleet: Fleet, data_dir: Path) -> AsyncIterator[FleetAudit]:
        """The fleet database (its spool copied in first), or the spool alone when the
        database cannot be reached: never raises for that. A local embedded store is
        started when needed and stopped at the end only when this call started it."""
        spool = AuditSpool(data_dir)
        started: EmbeddedPostgres | None = None
        conn: asyncpg.Connection | None = None
        why: str | None = None
        try:
            dsn = fleet.fleet.database
            if not dsn:
                server = EmbeddedPostgres(data_dir / STORE_DIR)
                was_running = server.postmaster_pid() is not None
                dsn = await asyncio.to_thread(server.start)
                started = None if was_running else server
            conn = await connect_fleet_database(dsn)
            copied = await spool.copy_into(conn)
            if copied:
                log.info("fleet.audit_spool_copied", records=copied)
        except SpoolError as exc:  # the spool itself: the database is there, use it
            log.warning("fleet.audit_spool_unusable", error=str(exc))
        except _UNREACHABLE as exc:
            why = _why(exc)
        if why is not None and conn is not None:
            await _close(conn)
            conn = None
        audit = cls(spool, conn, why)
        try:
            yield audit
        finally:
            if audit._conn is not None:
                await _close(audit._conn)
            if started is not None:
                try:
                    await asyncio.to_thread(started.stop)
                except _UNREACHABLE as exc:
                    log.warning("fleet.store_stop_failed", error=_why(exc))

    def unreachable(self) -> str | None:
        """Why the fleet database could not be used, or None when it is in use."""
        return self._why

    @property
    def spool_path(self) -> Path:
        """The local spool's file."""
        return self._spool.path

    async def record(self, action: FleetAction) -> str:
        """Record ``action``; returns where it went (for the command to say)."""
        if self._conn is not None:
            try:
                await self._conn.execute(fleet_query("fleet_audit_insert"), *action.row())
                return "fleet database"
            except _UNREACHABLE as exc:
                self._why = f"lost it: {_why(exc)}"
                await _close(self._conn)
                self._conn = None
        try:
            await asyncio.to_thread(self._spool.append, action)
        except OSError as exc:
            return (f"nowhere: fleet database unreachable ({self._why}) and spool "
                    f"{self._spool.path} not writable ({_why(exc)})")
        return f"spool {self._spool.path} (fleet database unreachable: {self._why})"

    async def records(self, node: str | None, since: datetime | None,
                      limit: int) -> list[AuditEntry]:
        """The fleet database's records and the spool's, newest first, at most ``limit``."""
        since = since or datetime.min.replace(tzinfo=UTC)
        found = {action.record_id: AuditEntry("spool", action)
                 for action in self._spool.pending()
                 if (node is None or action.node == node) and action.at >= since}
        if self._conn is not None:
            try:
                rows = await self._conn.fetch(fleet_query("fleet_audit_list"), node, since,
                                              limit)
            except _UNREACHABLE as exc:
                self._why = f"lost it: {_why(exc)}"
                await _close(self._conn)
                self._conn = None
                rows = []
            for row in rows:
                found[row["record_id"]] = AuditEntry("fleet", FleetAction(
                    row["action"], row["node"], row["operator"], row["reason"], row["result"],
                    json.loads(row["counts"]), row["record_id"], row["at"]))
        entries = sorted(found.values(), key=lambda entry: entry.record.at, reverse=True)
        return entries[:limit]


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=CONNECT_TIMEOUT_S)
    except _UNREACHABLE:
        conn.terminate()
