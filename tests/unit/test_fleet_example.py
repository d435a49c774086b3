"""The shipped example inventory documents every key and loads as it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mta.fleet.inventory import FleetSection, NodeEntry, load_fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "fleet.example.toml"


def test_example_fleet_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTA_ADMIN_TOKEN_A", "a-token")
    monkeypatch.setenv("MTA_ADMIN_TOKEN_B", "b-token")
    fleet = load_fleet(EXAMPLE)
    assert fleet.fleet.database.startswith("postgresql://")
    assert [node.name for node in fleet.nodes] == ["postal-a", "postal-b"]
    assert fleet.node("postal-a").admin_token() == "a-token"


def test_example_fleet_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    assert "[fleet]" in text and "[[nodes]]" in text
    for key in [*FleetSection.model_fields, *NodeEntry.model_fields]:
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), key
