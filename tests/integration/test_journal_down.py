"""A journal that cannot be written (a full disk) is visible and pauses delivery: no dot
goes out without its record, nothing is deferred or counted as an attempt, and delivery
resumes by itself once the disk has room again."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

from mta.config import Settings
from mta.queue import Store
from tests.support.admin import admin_get, metric
from tests.support.delivery import submit_tagged
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess
from tests.support.sink import Sink


async def journal_up(node: NodeProcess) -> float:
    return await metric(node.admin_port, "mta_journal_up")


async def test_a_full_journal_disk_pauses_delivery_and_it_resumes_when_there_is_room(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    full = tmp_path / "disk-full"
    full.touch()
    node = NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 0.5,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })
    node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_FAIL_AT": "journal.write",
                "MTA_FAULT_FAIL_WHILE": str(full)}
    await node.start()
    store = await Store.open(db_dsn, make_settings())
    try:
        assert await journal_up(node) == 1
        sent: list[uuid.UUID] = [await submit_tagged(node.smtp_port, f"j{n}") for n in range(3)]

        async def down() -> bool:
            return await journal_up(node) == 0

        await wait_for(down, timeout=15)
        status, body = await admin_get(node.admin_port, "/readyz")
        assert status == 503 and json.loads(body)["journal_up"] is False
        await node.wait_logged("delivery.journal_down")
        for message_id in sent:
            (delivery,) = await store.deliveries(message_id)
            assert (delivery.state, delivery.attempts) in {("queued", 0), ("leased", 0)}, \
                delivery
        assert sink.deliveries() == 0, "no dot went out without its record"

        full.unlink()

        async def delivered() -> bool:
            states = [(await store.deliveries(m))[0].state for m in sent]
            return states == ["delivered"] * len(sent)

        await wait_for(delivered, timeout=20)

        async def ready() -> bool:
            return (await journal_up(node) == 1
                    and (await admin_get(node.admin_port, "/readyz"))[0] == 200)

        await wait_for(ready, timeout=10)
        assert all(sink.count(f"j{n}@test", "user@example.com") == 1 for n in range(3))
        assert node.logged("delivery.journal_resumed")
    finally:
        await store.close()
        await node.close()
