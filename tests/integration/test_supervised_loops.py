"""I7: every background loop is supervised. A loop that fails (here admission's refresh,
made to fail by the fault hook) is logged, counted and restarted with backoff; while it
keeps failing ``/readyz`` is 503 and names it; once it runs again the node is ready."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.support.admin import admin_get, metric
from tests.support.delivery import submit_tagged
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess

FAILURES = re.escape('mta_task_failures_total{task="admission"}')


async def test_a_failing_loop_is_restarted_counted_and_named_in_readyz(
    tmp_path: Path, db_dsn: str,
) -> None:
    failing = tmp_path / "admission-fails"
    node = NodeProcess.configure(tmp_path / "node", db_dsn,
                                 database={"queued_bytes_refresh": 0.2})
    node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_FAIL_AT": "admission.refresh",
                "MTA_FAULT_FAIL_WHILE": str(failing)}
    await node.start()
    try:
        assert await metric(node.admin_port, FAILURES) == 0
        failing.touch()

        async def named() -> bool:
            status, body = await admin_get(node.admin_port, "/readyz")
            return status == 503 and json.loads(body)["failing_tasks"] == ["admission"]

        await wait_for(named, timeout=20)
        assert await metric(node.admin_port, FAILURES) >= 3
        await node.wait_logged("node.task_failed")
        await submit_tagged(node.smtp_port, "meanwhile")  # intake goes on meanwhile
        failing.unlink()

        async def ready() -> bool:
            return (await admin_get(node.admin_port, "/readyz"))[0] == 200

        await wait_for(ready, timeout=30)
        assert node.process is not None and node.process.poll() is None
    finally:
        await node.close()
