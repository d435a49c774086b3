"""I7: a node whose external store is down at start does not exit. It serves /healthz,
/metrics (mta_store_up 0) and /readyz (503), answers SMTP 421 4.3.2, and starts for real
by itself once the store answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mta.intake import replies
from tests.support.admin import admin_get, healthz, metric
from tests.support.delivery import submit_tagged
from tests.support.nodes import wait_for
from tests.support.pg import DATABASE, own_postgres
from tests.support.process import NodeProcess
from tests.support.smtp import RawSMTP


async def test_a_node_started_while_its_store_is_down_waits_for_it(tmp_path: Path) -> None:
    async with own_postgres(tmp_path / "pg") as server:
        await asyncio.to_thread(server.stop)
        node = NodeProcess.configure(tmp_path / "node", server.dsn_for(DATABASE),
                                     database={"connect_timeout": 1.0})
        node.spawn()
        try:
            await node.wait_logged("node.waiting_for_store", timeout=30)
            assert (await healthz(node.admin_port))["store_up"] is False
            assert await metric(node.admin_port, "mta_store_up") == 0
            assert (await admin_get(node.admin_port, "/readyz"))[0] == 503
            client = await RawSMTP.connect(node.smtp_port)
            assert client.greeting == replies.STORE_NOT_READY
            await client.close()
            assert node.process is not None and node.process.poll() is None, "it did not exit"

            await asyncio.to_thread(server.start)
            await node.wait_logged("node.started", timeout=60)

            async def ready() -> bool:
                return (await admin_get(node.admin_port, "/readyz"))[0] == 200

            await wait_for(ready, timeout=15)
            await submit_tagged(node.smtp_port, "after-the-store-came")
        finally:
            await node.close()
