"""Every panel of the Grafana dashboard, run against a real Prometheus scraping a real
node (which has accepted, delivered and deferred mail) and a controller: each expression
parses and returns at least one series (issue 12)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.support.delivery import submit_tagged
from tests.support.fleet import ControllerProcess, FleetUnderTest
from tests.support.nodes import wait_for
from tests.support.prometheus import Prometheus
from tests.support.sink import Faults, Sink

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "mta-fleet.json"


def panel_expressions() -> dict[str, str]:
    """Each panel's expression, with the template variables set to "all"."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {panel["title"]: target["expr"].replace("$node", ".*").replace("$destination", ".*")
            for panel in panels for target in panel.get("targets", [])}


async def test_every_panel_returns_series_from_a_live_node_and_controller(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    sink.faults = Faults(tempfail=0.3)
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": sink.port})
    fleet.database = new_database()
    fleet.controller = {"poll_interval": "0.5s"}
    fleet.rules = [{"signal": "oldest_pending_s", "above": 0, "for": "0s",
                    "action": "drain"}]
    fleet.write()
    controller = None
    prometheus = None
    try:
        await fleet.start()
        node = fleet.nodes["a"]
        for n in range(20):
            await submit_tagged(node.smtp_port, f"dash{n}")
        await sink.wait_for_count(5, timeout=30)
        controller = ControllerProcess.spawn(fleet, "--dry-run")
        prometheus = Prometheus(tmp_path / "prometheus", {
            "mta-node": [f"127.0.0.1:{node.admin_port}"],
            "mta-controller": [f"127.0.0.1:{controller.port}"]})
        await prometheus.start()
        missing: dict[str, str] = {}
        for title, expr in panel_expressions().items():
            async def answers(expr: str = expr) -> bool:
                return bool(await prometheus.query(expr))  # type: ignore[union-attr]

            try:
                await wait_for(answers, timeout=30, interval=0.5)
            except AssertionError:
                missing[title] = expr
        assert missing == {}, f"panels with no series: {missing}"
    finally:
        if prometheus is not None:
            prometheus.close()
        if controller is not None:
            await controller.close()
        await fleet.close()
