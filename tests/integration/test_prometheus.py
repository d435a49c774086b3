"""Smoke test of deploy/prometheus/alerts.yml with a real Prometheus on loopback scraping
a real node process every second (issue 12). The cases share one server and one node
and run in file order: the store is stopped, then the node is killed."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.nodes import wait_for
from tests.support.process import NodeProcess
from tests.support.prometheus import Prometheus


@dataclass
class Watched:
    """A node process, its database and the Prometheus server scraping it."""

    node: NodeProcess
    database: str
    prometheus: Prometheus
    admin_dsn: str

    async def allow_connections(self, allowed: bool) -> None:
        """Let the node's store take connections, or refuse them and end its sessions."""
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"ALTER DATABASE {self.database} WITH ALLOW_CONNECTIONS "
                                f"{'true' if allowed else 'false'}")
            if not allowed:
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = $1", self.database)
        finally:
            await admin.close()


@pytest.fixture(scope="module")
async def watched(pg_admin_dsn: str, template_dsn: str,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Watched]:
    """One node subprocess on a database of its own, scraped by one Prometheus whose
    rules fire after 1 s (MtaNodeDown after 10 min: it stays pending)."""
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    database = f"test_{uuid.uuid4().hex[:12]}"
    template = urlsplit(template_dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {database} TEMPLATE {template}")
    finally:
        await admin.close()
    dsn = urlunsplit(urlsplit(pg_admin_dsn)._replace(path=f"/{database}"))
    node = NodeProcess.configure(workdir / "node", dsn, node={"name": "watched"})
    prometheus = Prometheus(workdir / "prometheus",
                            {"mta-node": [f"127.0.0.1:{node.admin_port}"]},
                            fors={"MtaNodeDown": "10m"})
    watched = Watched(node, database, prometheus, pg_admin_dsn)
    try:
        await node.start()
        await prometheus.start()
        yield watched
    finally:
        prometheus.close()
        await node.close()
        await watched.allow_connections(True)
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        finally:
            await admin.close()


async def test_prometheus_scrapes_the_node(watched: Watched) -> None:
    async def scraped() -> bool:
        result = await watched.prometheus.query('up{job="mta-node"}')
        return [r["value"][1] for r in result] == ["1"]

    await wait_for(scraped, timeout=20, interval=0.2)
    assert await watched.prometheus.alert_states("MtaStoreDown") == set()
    assert await watched.prometheus.alert_states("MtaWatchdog") == {"firing"}


async def test_stopping_the_store_raises_mta_store_down(watched: Watched) -> None:
    await watched.allow_connections(False)

    async def raised() -> bool:
        return bool(await watched.prometheus.alert_states("MtaStoreDown")
                    & {"pending", "firing"})

    await wait_for(raised, timeout=30, interval=0.2)
    assert await watched.prometheus.alert_states("MtaNodeDown") == set()


async def test_killing_the_node_makes_mta_node_down_pending(watched: Watched) -> None:
    watched.node.signal(signal.SIGKILL)

    async def pending() -> bool:
        return await watched.prometheus.alert_states("MtaNodeDown") == {"pending"}

    await wait_for(pending, timeout=30, interval=0.2)
