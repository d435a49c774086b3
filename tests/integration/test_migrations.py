"""Migrations on an empty database: concurrent starts and the ``mta db migrate`` command."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from mta.queue.migrate import available_migrations, migrate
from tests.support.process import NodeProcess, run_mta, write_config


@pytest.fixture
async def empty_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A new database made from ``template1`` (no schema), dropped after the test."""
    name = f"empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(pg_admin_dsn)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


async def applied_versions(dsn: str) -> list[int]:
    """Every row of ``schema_migrations``, by version."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [row["version"] for row in rows]


async def test_concurrent_migrations_apply_each_version_once(empty_dsn: str) -> None:
    """Five processes starting at once on an empty database: all succeed, no double DDL."""
    expected = [migration.version for migration in available_migrations()]
    assert expected, "the package ships migrations"
    conns = [await asyncpg.connect(empty_dsn) for _ in range(5)]
    try:
        assert await conns[0].fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        results = await asyncio.wait_for(asyncio.gather(*(migrate(c) for c in conns)), 60)
    finally:
        for conn in conns:
            await conn.close()
    applied = Counter(version for result in results for version in result)
    assert sorted(applied) == expected
    assert set(applied.values()) == {1}, applied
    assert await applied_versions(empty_dsn) == expected
    conn = await asyncpg.connect(empty_dsn)
    try:
        tables = {row["tablename"] for row in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    finally:
        await conn.close()
    assert {"messages", "deliveries", "schema_migrations"} <= tables


async def test_db_migrate_command_applies_then_reports_up_to_date(
    tmp_path: Path, empty_dsn: str
) -> None:
    """``mta db migrate --config F`` migrates an empty database, and a second run is a no-op."""
    config = NodeProcess.configure(tmp_path, empty_dsn)
    write_config(config.config_path, config.sections)
    expected = [migration.version for migration in available_migrations()]

    first = await run_mta("db", "migrate", "--config", str(config.config_path))
    assert first.returncode == 0, first
    assert first.stdout.strip() == f"applied migrations: {expected}", first.stdout
    assert await applied_versions(empty_dsn) == expected

    second = await run_mta("db", "migrate", "--config", str(config.config_path))
    assert second.returncode == 0, second
    assert second.stdout.strip() == "schema is up to date", second.stdout
    assert await applied_versions(empty_dsn) == expected
