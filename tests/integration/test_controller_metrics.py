"""The controller counts the deliveries its reroutes moved, by source node (issue 12)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from mta.queue import Store
from tests.support.admin import metric
from tests.support.fleet import ControllerProcess, FleetUnderTest, enqueue_tagged
from tests.support.nodes import free_port, wait_for
from tests.support.sink import Sink

RULE = {"signal": "oldest_pending_s", "above": 1, "for": "1s", "action": "isolate",
        "reroute": True}


async def test_a_controller_reroute_is_counted_in_its_metrics(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": free_port(), "b": sink.port})
    fleet.database = new_database()
    fleet.controller = {"poll_interval": "0.3s", "max_nodes_out": 1}
    fleet.rules = [RULE]
    fleet.write()
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    controller = None
    try:
        await enqueue_tagged(store, ["m1", "m2", "m3"])
        await fleet.start()
        controller = ControllerProcess.spawn(fleet)
        name = re.escape('mta_controller_rerouted_deliveries_total{node="a"}')

        async def counted() -> bool:
            try:
                return await metric(controller.port, name) == 3
            except (OSError, AssertionError):
                return False

        await wait_for(counted, timeout=60, interval=0.2)
    finally:
        if controller is not None:
            await controller.close()
        await store.close()
        await fleet.close()
