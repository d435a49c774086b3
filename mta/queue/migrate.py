"""Versioned schema migrations, applied under an advisory lock.

Each package that owns a schema ships a ``migrations`` folder (``mta.queue`` for a node's
store, ``mta.fleet`` for the fleet database); the ledger is ``schema_migrations`` in the
connection's search path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from mta.queue.sql import query

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One schema change: its version, name and DDL."""

    version: int
    name: str
    sql: str


#: The package whose ``migrations`` folder holds a node store's schema.
STORE_PACKAGE = "mta.queue"


def available_migrations(package: str = STORE_PACKAGE) -> list[Migration]:
    """Every migration shipped in ``package``'s ``migrations`` folder, in version order."""
    folder = resources.files(package).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    return found


async def pending_migrations(conn: asyncpg.Connection,
                             package: str = STORE_PACKAGE) -> list[int]:
    """The shipped migrations this database has not applied (all of them on an empty
    one); reads only."""
    try:
        done = {row["version"] for row in await conn.fetch(query("migrations_applied"))}
    except asyncpg.UndefinedTableError:
        done = set()
    return [m.version for m in available_migrations(package) if m.version not in done]


async def migrate(conn: asyncpg.Connection, package: str = STORE_PACKAGE) -> list[int]:
    """Apply ``package``'s missing migrations; safe when several processes start at once.

    Returns the versions this call applied.
    """
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute(query("migrations_lock"))
        await conn.execute(query("migrations_create_table"))
        done = {row["version"] for row in await conn.fetch(query("migrations_applied"))}
        for migration in available_migrations(package):
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(query("migrations_record"), migration.version, migration.name)
            applied_now.append(migration.version)
    return applied_now
