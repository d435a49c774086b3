"""The Grafana dashboard (deploy/grafana/mta-fleet.json): valid JSON, its template
variables, and every metric it queries is one the node or the controller exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mta.admin.metrics import Metrics
from mta.fleet.controller import ControllerMetrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "mta-fleet.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum"),
            "gauge": ("",), "info": ("_info",), "summary": ("_count", "_sum")}


def exported_names() -> set[str]:
    """Every sample name the node and the controller can export."""
    names: set[str] = set()
    for registry in (Metrics("n").registry, ControllerMetrics().registry):
        for family in registry.collect():  # labelled families without children too
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = exported_names()
    used = {name for expr in expressions() for name in re.findall(r"\bmta_[a-z0-9_]+", expr)}
    assert used, "the dashboard queries something"
    assert used - exported == set()


def test_the_dashboard_has_node_and_destination_variables_and_a_panel_per_area() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"node", "destination"} <= variables
    rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert rows == {"Intake", "Delivery", "Queue", "Store, pool and journal",
                    "Modes and controller"}
    assert all(e.count("(") == e.count(")") for e in expressions())
